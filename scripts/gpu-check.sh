#!/usr/bin/env bash
# Checks a GPU machine in one go: is CUDA seen, does a short LISA run on the GPU agree with the same run
# on the CPU (f32), and do bf16 and fp16 mixed precision agree with f32 on the GPU; with step times at the
# default batch (32) and at a large one (256); then one SD1.5-size ControlNet step (configs/real-size, random
# weights, 64x64 latents, batch 1), baseline and LISA, with and without activation recomputation, f32 and bf16
# frozen weights, ours and diffusers' (when the venv has diffusers), each variant in a process of its own with the
# GPU's used memory sampled beside it (nvidia-smi, every 100 ms; CUDA context included, alike for both).
# Exits non-zero when a comparison fails or one of our real-size steps fails.
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
# One real-size variant of `who` (ours | diffusers), its JSON line and its peak GPU memory, into $out/real-size.
real_size() {
  local who=$1 variant=$2 log="$out/real-size/$1-$2"
  local args=(--real-size-variant "$variant" --unet-config configs/real-size/stable-diffusion-v1-5-unet.json
              --latent-size 64 --batch 1 --warmup 2 --reps 5 --device cuda)
  nvidia-smi --query-gpu=memory.used --format=csv,noheader,nounits -lms 100 > "$log.gpu-mib" 2>/dev/null &
  local smi=$!
  local rc=0
  if [ "$who" = ours ]; then
    "$bin" bench "${args[@]}" > "$log.json" 2> "$log.log" || rc=$?
  else
    .venv/bin/python bench/reference.py "${args[@]}" > "$log.json" 2> "$log.log" || rc=$?
  fi
  kill "$smi" 2>/dev/null; wait "$smi" 2>/dev/null
  local peak; peak=$(sort -n "$log.gpu-mib" | tail -n 1)
  echo "$who $variant: rc $rc, peak GPU memory ${peak:-?} MiB: $(tail -n 1 "$log.json")"
  return $rc
}
mkdir -p "$out/real-size"
have_diffusers=0
.venv/bin/python -c "import diffusers" 2>/dev/null && have_diffusers=1
echo "== real-size step (SD1.5 UNet config; diffusers beside ours: $([ $have_diffusers = 1 ] && echo yes || echo 'no, venv lacks it'))"
for variant in baseline baseline-recompute lisa lisa-recompute baseline-bf16 baseline-recompute-bf16 lisa-bf16 \
               lisa-recompute-bf16; do
  real_size ours "$variant" | tee -a "$out/real-size.log" || status=1
  if [ $have_diffusers = 1 ]; then
    real_size diffusers "$variant" | tee -a "$out/real-size.log"
  fi
done
echo "gpu-check: $([ $status = 0 ] && echo passed || echo FAILED)"
exit $status
