#!/usr/bin/env bash
# The wheels the lent GPU machine lacks for tools/gpu_check.py, pinned, one version each, into
# gpu_wheels/ (git-ignored: it travels only when the device call names it in `carry`). The
# machine already has torch, numpy, packaging, pyyaml, einops, msgpack, ninja, psutil,
# py-cpuinfo, tqdm, typing-extensions, sentencepiece, safetensors, pillow, mpi4py (see the
# device tool's KINDS.md). Not carried: PyAV (33 MiB; the check builds its shards from the
# embedded procedural videos, which need no FFmpeg). Ends with the travel-size check (<= 55 MiB
# of the 64 MiB a call carries). Run here, where the package registry is reachable:
#   bash tools/gpu_wheels.sh                 DEST=dir to write elsewhere
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-.venv/bin/python}
DEST=${DEST:-gpu_wheels}
rm -rf "$DEST" && mkdir -p "$DEST"
# DeepSpeed is an sdist whose setup imports torch: its pure-Python wheel is built here.
DS_BUILD_OPS=0 "$PY" -m pip wheel -q --no-deps --no-build-isolation -w "$DEST" deepspeed==0.19.8
# For the machine's CPython 3.12 on x86_64. pydantic 2.9 asks typing-extensions >= 4.6.1 only.
"$PY" -m pip download -q --dest "$DEST" --no-deps --only-binary=:all: --python-version 3.12 \
  --implementation cp --platform manylinux_2_28_x86_64 --platform manylinux_2_17_x86_64 \
  --platform manylinux2014_x86_64 \
  megatron-core==0.19.2 webdataset==1.0.2 braceexpand==0.1.7 hjson==3.1.0 \
  pydantic==2.9.2 pydantic-core==2.23.4 annotated-types==0.7.0 2>&1 | grep -v "^WARNING: Location" || true
names=$(ls "$DEST" | sed 's/-[0-9].*//' | tr 'A-Z_' 'a-z-' | sort)
if [ "$(echo "$names" | uniq -d)" != "" ]; then
  echo "error: two versions of one wheel in $DEST: $(echo "$names" | uniq -d)" >&2; exit 1
fi
ls -l "$DEST"
"$PY" tools/travel_size.py --carry "$DEST"
