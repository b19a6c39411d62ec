#!/usr/bin/env bash
# Create .venv with everything localopt-plugin needs, on a machine with or without CUDA.
# Usage: bash tools/setup_env.sh            (idempotent; re-running only checks the install)
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
VENV=${VENV:-.venv}
TORCH_CPU_VERSION=${TORCH_CPU_VERSION:-2.13.0}
DEEPSPEED_VERSION=${DEEPSPEED_VERSION:-0.19.8}

[ -x "$VENV/bin/python" ] || "$PY" -m venv "$VENV"
pip() { "$VENV/bin/python" -m pip "$@"; }
pip install -q --upgrade pip

# A bare `torch` requirement pulls a multi-GB CUDA build: pin the CPU build where there is no GPU.
if ! "$VENV/bin/python" -c "import torch" 2>/dev/null; then
  if command -v nvidia-smi >/dev/null 2>&1 && nvidia-smi -L >/dev/null 2>&1; then
    pip install -q torch
  else
    pip install -q "torch==${TORCH_CPU_VERSION}"
  fi
fi
# DeepSpeed's setup.py imports torch, and its CUDA/C++ ops are JIT-built only when used.
if ! "$VENV/bin/python" -c "import deepspeed" 2>/dev/null; then
  DS_BUILD_OPS=0 pip install -q --no-build-isolation "deepspeed==${DEEPSPEED_VERSION}"
fi
pip install -q -e ".[dev,eval,mpi-runtime]"
"$VENV/bin/python" -W ignore -c "import torch, deepspeed, megatron.core, webdataset, sentencepiece; \
print(f'localopt-plugin env ready: torch {torch.__version__}, deepspeed {deepspeed.__version__}, \
megatron-core {megatron.core.__version__}')"
# DeepSpeed's CPU shared-memory collective op, built once here (where the plugin's platform module
# points TORCH_EXTENSIONS_DIR), not by two ranks at once in the first distributed run.
if [ -z "${CUDA_VISIBLE_DEVICES:-}" ] && ! command -v nvidia-smi >/dev/null 2>&1; then
  TORCH_EXTENSIONS_DIR="${TORCH_EXTENSIONS_DIR:-$(cd "$VENV" && pwd)/torch_extensions}" "$VENV/bin/python" -W ignore -c \
    "from deepspeed.ops.op_builder.cpu import ShareMemCommBuilder; ShareMemCommBuilder().load()" \
    >/dev/null 2>&1 || echo "note: DeepSpeed's shm op was not prebuilt; the first run builds it"
fi
