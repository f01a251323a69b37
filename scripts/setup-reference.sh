#!/usr/bin/env bash
# Idempotent setup of the PyTorch + diffusers REFERENCE (bench/reference.py) next to our libtorch.
#
# scripts/setup.sh installs torch==2.13.0 into the project's .venv with --no-deps (we only need its
# libtorch). To `import torch` and `import diffusers` in Python, this script adds:
#   - the pure-Python packages torch imports: typing_extensions, sympy, networkx, jinja2, fsspec,
#     filelock, numpy (installed with --no-deps, so pip never re-resolves torch);
#   - diffusers==$DIFFUSERS_VERSION with its dependencies (huggingface-hub, safetensors, regex,
#     requests, Pillow, importlib_metadata, ...; diffusers does not depend on torch itself),
#     under a constraint file that pins torch to the installed version;
#   - transformers==$TRANSFORMERS_VERSION (CLIPTextModel, CLIPTokenizer; with tokenizers) under the
#     same constraint, for scripts/make-tiny-diffusers.py;
#   - the CUDA shared libraries that torch's PYTHON extension links (libtorch_python.so NEEDs
#     libtorch_cuda.so, which NEEDs cuDNN, cuBLAS, cuFFT, cuSPARSE(Lt), cuRAND, cuFile, NCCL, NVRTC,
#     NVSHMEM): without them `import torch` fails with "libcudnn.so.9: cannot open shared object
#     file", even on a CPU-only machine (our Rust binaries link libtorch_cpu.so only and do not need
#     them). The wheels, at the versions torch==2.13.0 declares, go into $VENV/lisa-reference-cuda
#     (pip --target, ~2.5 GB), NOT into site-packages: build.rs force-links libtorch_cuda when it
#     sees site-packages/nvidia/cudnn, which would change every later Rust build that uses this venv.
#     bench/reference.py puts their lib/ folders on LD_LIBRARY_PATH (it re-executes itself once).
# It never installs, upgrades or removes torch, and checks afterwards that torch is untouched.
#
# Which venv: $VENV if set; else the project's .venv; else the venv that the .libtorch link points
# into (a git worktree has no .venv of its own, but its .libtorch link resolves to
# <venv>/lib/pythonX.Y/site-packages/torch). E.g. from a worktree:
#   VENV=<repo>/.venv bash scripts/setup-reference.sh      (explicit)
#   bash scripts/setup-reference.sh                            (resolved from .libtorch)
set -euo pipefail
cd "$(dirname "$0")/.."

DIFFUSERS_VERSION=0.42.1
TRANSFORMERS_VERSION=5.24.0
TORCH_VERSION=2.13.0

if [ -z "${VENV:-}" ]; then
  if [ -x .venv/bin/python ]; then
    VENV=.venv
  elif [ -e .libtorch ]; then
    # .libtorch -> <venv>/lib/pythonX.Y/site-packages/torch
    VENV=$(cd "$(readlink -f .libtorch)/../../../.." && pwd)
  else
    echo "setup-reference: no .venv and no .libtorch link; run scripts/setup.sh first or set VENV" >&2
    exit 1
  fi
fi
PY="$VENV/bin/python"
[ -x "$PY" ] || { echo "setup-reference: $PY not found (set VENV to the venv holding torch==$TORCH_VERSION)" >&2; exit 1; }

torch_version() { "$PY" -m pip list --format=freeze 2>/dev/null | sed -n 's/^torch==//p'; }
have=$(torch_version)
if [ "$have" != "$TORCH_VERSION" ]; then
  echo "setup-reference: $VENV has torch '${have:-none}', expected $TORCH_VERSION; run scripts/setup.sh first" >&2
  exit 1
fi
torch_dir=$("$PY" -c 'import sysconfig; print(sysconfig.get_paths()["purelib"])')/torch
stamp_before=$(stat -c %Y "$torch_dir/lib/libtorch_cpu.so")

marker="$VENV/.lisa-reference-diffusers-$DIFFUSERS_VERSION-transformers-$TRANSFORMERS_VERSION"
cuda_dir="$VENV/lisa-reference-cuda"
cuda_path() { ls -d "$cuda_dir"/nvidia/*/lib 2>/dev/null | tr '\n' ':'; }
import_check() { LD_LIBRARY_PATH="$(cuda_path)${LD_LIBRARY_PATH:-}" "$PY" -c "$1"; }
if [ -f "$marker" ] && import_check 'import torch, diffusers, transformers' >/dev/null 2>&1; then
  echo "setup-reference: ok (already installed: torch $TORCH_VERSION, diffusers $DIFFUSERS_VERSION, transformers $TRANSFORMERS_VERSION in $VENV)"
  exit 0
fi

constraints=$(mktemp)
trap 'rm -f "$constraints"' EXIT
echo "torch==$TORCH_VERSION" >"$constraints"

echo "setup-reference: installing torch's Python dependencies into $VENV"
"$PY" -m pip install -q --no-deps \
  "typing_extensions>=4.10.0" "sympy>=1.13.3" "mpmath>=1.1.0,<1.4" "networkx>=2.5.1" jinja2 "MarkupSafe>=2.0" \
  "fsspec>=0.8.5" filelock numpy
echo "setup-reference: installing diffusers==$DIFFUSERS_VERSION and its dependencies into $VENV"
"$PY" -m pip install -q -c "$constraints" "diffusers==$DIFFUSERS_VERSION"
echo "setup-reference: installing transformers==$TRANSFORMERS_VERSION and its dependencies into $VENV"
"$PY" -m pip install -q -c "$constraints" "transformers==$TRANSFORMERS_VERSION"

# The pins torch==2.13.0 declares (directly, or through cuda-toolkit==13.0.3's extras).
cuda_wheels=(
  "nvidia-cublas==13.1.1.3.*" "nvidia-cuda-nvrtc==13.0.88.*" "nvidia-cufft==12.0.0.61.*"
  "nvidia-nvjitlink>=13.0.88,<14" "nvidia-cufile==1.15.1.6.*" "nvidia-curand==10.4.0.35.*"
  "nvidia-cusparse==12.6.3.3.*" "nvidia-cudnn-cu13==9.20.0.48" "nvidia-cusparselt-cu13==0.8.1"
  "nvidia-nccl-cu13==2.29.7" "nvidia-nvshmem-cu13==3.4.5"
)
if import_check 'import torch' >/dev/null 2>&1; then
  echo "setup-reference: torch imports with the libraries in $cuda_dir (kept)"
else
  echo "setup-reference: installing the CUDA libraries torch's Python extension links into $cuda_dir (~2.5 GB)"
  "$PY" -m pip install -q --no-deps --upgrade --target "$cuda_dir" "${cuda_wheels[@]}"
fi

after=$(torch_version)
stamp_after=$(stat -c %Y "$torch_dir/lib/libtorch_cpu.so")
if [ "$after" != "$TORCH_VERSION" ] || [ "$stamp_before" != "$stamp_after" ]; then
  echo "setup-reference: error: the torch install changed (now '$after'); rerun scripts/setup.sh" >&2
  exit 1
fi
import_check 'import torch, diffusers, transformers; print("setup-reference: import check: torch", torch.__version__, "diffusers", diffusers.__version__, "transformers", transformers.__version__)'
rm -f "$VENV"/.lisa-reference-diffusers-*
touch "$marker"
echo "setup-reference: ok (torch $TORCH_VERSION unchanged, diffusers $DIFFUSERS_VERSION, transformers $TRANSFORMERS_VERSION in $VENV;"
echo "  run the reference with $VENV/bin/python bench/reference.py, which sets LD_LIBRARY_PATH itself)"
