#!/usr/bin/env bash
# Checks a GPU machine in one go: is CUDA seen, does a short LISA run on the GPU agree with the same run
# on the CPU (f32), and do bf16 and fp16 mixed precision agree with f32 on the GPU; with step times at the
# default batch (32) and at a large one (256). Exits non-zero when a comparison fails.
#
#   bash scripts/gpu-check.sh                      # installs the CUDA libtorch (scripts/setup.sh) and builds
#   bash scripts/gpu-check.sh path/to/lisa OUTDIR [device-check options]  # with a binary built for this machine
#
# A binary built against a libtorch without its CUDA library linked in (the lean CPU install) still runs
# on the GPU when LISA_PRELOAD_CUDA=1 and LISA_TORCH_LIB point at a CUDA libtorch of the same version:
# libtorch_cuda.so is then preloaded, which registers its kernels as linking it would.
set -uo pipefail
cd "$(dirname "$0")/.."
bin=${1:-}
out=${2:-runs/gpu-check}
shift $(( $# < 2 ? $# : 2 ))  # the rest goes to `lisa device-check` (e.g. --set main_network=DIR)
mkdir -p "$out"

echo "== nvidia-smi"
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv || echo "gpu-check: nvidia-smi failed"

if [ -z "$bin" ]; then
  LISA_TORCH=full bash scripts/setup.sh || exit 1
  cargo build --bin lisa || exit 1
  bin=target/debug/lisa
fi
if [ "${LISA_PRELOAD_CUDA:-0}" = 1 ]; then
  lib=${LISA_TORCH_LIB:?set LISA_TORCH_LIB to the torch/lib folder of a CUDA libtorch}
  export LD_LIBRARY_PATH="$lib${LD_LIBRARY_PATH:+:$LD_LIBRARY_PATH}"
  export LD_PRELOAD="$lib/libtorch_cuda.so${LD_PRELOAD:+:$LD_PRELOAD}"
fi

status=0
for batch in 32 256; do
  echo "== device-check, batch $batch"
  "$bin" device-check --device cuda --batch "$batch" --output-dir "$out/batch-$batch" --quiet "$@" 2>&1 \
    | tee "$out/batch-$batch.log" || status=1
done
echo "gpu-check: $([ $status = 0 ] && echo passed || echo FAILED)"
exit $status
