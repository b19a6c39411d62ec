#!/usr/bin/env bash
# Wheels a lent GPU machine lacks (Python 3.12, torch already installed, no network), into
# gpu_wheels/ (git-ignored), for tools/gpu_check.sh. Run here, where PyPI is reachable:
#   bash tools/gpu_wheels.sh && du -sh gpu_wheels      (the device tool carries up to 64 MiB)
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-.venv/bin/python}
DEST=${DEST:-gpu_wheels}
mkdir -p "$DEST"
# DeepSpeed is an sdist whose setup imports torch: build its pure-Python wheel here.
DS_BUILD_OPS=0 "$PY" -m pip wheel -q --no-deps --no-build-isolation -w "$DEST" deepspeed==0.19.8
# Binary wheels for the device's interpreter; torch and its CUDA libraries are already there.
"$PY" -m pip download -q --dest "$DEST" --only-binary=:all: --python-version 3.12 \
  --platform manylinux2014_x86_64 --platform manylinux_2_17_x86_64 --platform manylinux_2_28_x86_64 \
  --no-deps megatron-core==0.19.2 webdataset braceexpand sentencepiece hjson ninja py-cpuinfo \
  pydantic pydantic-core annotated-types typing-inspection msgpack einops safetensors psutil \
  av pillow tqdm
ls -la "$DEST"
