#!/usr/bin/env bash
# A second environment where Megatron-LM's pretrain() exists: Python 3.12 (megatron.training
# ships in megatron-core >= 0.17, whose code needs Python >= 3.12), torch from the registry (on
# 3.12 that is the CUDA build, about 4.7 GB, which also runs on CPU), DeepSpeed, megatron-core
# 0.19.2 and the plugin; megatron-core 0.17.1 and 0.18.2 beside it, to put first on PYTHONPATH.
# Usage: bash tools/setup_megatron_lm_env.sh      (idempotent; re-running only checks)
#   VENV=.venv312  PYTHON312=/path/to/python3.12   override the defaults
set -euo pipefail
cd "$(dirname "$0")/.."
VENV=${VENV:-.venv312}
PY=${PYTHON312:-}
if [ -z "$PY" ]; then  # the first Python 3.12 that runs (a pyenv shim may not)
  for candidate in $(command -v python3.12 2>/dev/null) "$HOME"/.pyenv/versions/3.12*/bin/python3.12; do
    if "$candidate" --version >/dev/null 2>&1; then PY=$candidate; break; fi
  done
fi
if [ -z "$PY" ] || ! "$PY" --version >/dev/null 2>&1; then
  echo "error: no Python 3.12 found (set PYTHON312=/path/to/python3.12)" >&2
  exit 2
fi
TORCH_VERSION=${TORCH_VERSION:-2.13.0}
[ -x "$VENV/bin/python" ] || "$PY" -m venv "$VENV"
pip() { "$VENV/bin/python" -m pip "$@"; }
pip install -q --upgrade pip 2>&1 | grep -v "WARNING: Location" || true
"$VENV/bin/python" -c "import torch" 2>/dev/null || pip install -q "torch==${TORCH_VERSION}"
"$VENV/bin/python" -c "import deepspeed" 2>/dev/null || \
  DS_BUILD_OPS=0 pip install -q --no-build-isolation deepspeed==0.19.8
pip install -q "megatron-core==0.19.2" pytest -e .  # pytest: the GPU check's rehearsal
for version in 0.17.1 0.18.2; do
  target="$VENV/megatron-core-$version"
  [ -d "$target/megatron" ] || pip install -q --no-deps --target "$target" "megatron-core==$version"
done
"$VENV/bin/python" -W ignore -c "import torch, deepspeed, megatron.training, megatron.core; \
print(f'Megatron-LM env ready: Python 3.12, torch {torch.__version__}, deepspeed \
{deepspeed.__version__}, megatron-core {megatron.core.__version__}')"
