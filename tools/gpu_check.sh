#!/usr/bin/env bash
# The prepared GPU check (about 6 minutes on one H100; must stay under 8): installs the wheels
# carried in gpu_wheels/ (tools/gpu_wheels.sh), runs the GPU-marked tests (TransformerEngine
# path equals the SDPA path when TE is importable; a fused attention kernel, not the math path,
# runs the window attention) and localopt-bench speed at the 110m preset in bf16, with the TE
# spec when TE is importable, and Megatron-LM's pretrain() with the plugin (TE spec when available).
# Writes $OUT (default gpu_results/): pytest log, speed JSON/table, pretrain log.
#   bash tools/gpu_check.sh [OUT]
set -euo pipefail
cd "$(dirname "$0")/.."
OUT=${1:-${OUT:-gpu_results}}
mkdir -p "$OUT"
PY=${PYTHON:-python3}
nvidia-smi -L | tee "$OUT/device.txt"
"$PY" -c "import torch; print('torch', torch.__version__, torch.version.cuda)" | tee -a "$OUT/device.txt"
if [ -d gpu_wheels ]; then
  "$PY" -m pip install -q --no-index --find-links gpu_wheels --no-deps gpu_wheels/*.whl
fi
"$PY" -m pip install -q --no-deps --no-build-isolation -e . 2>&1 | tail -2 || true
TE=local
if "$PY" -c "import transformer_engine" 2>/dev/null; then TE=transformer_engine; fi
echo "transformer impl for the benchmark: $TE" | tee -a "$OUT/device.txt"
export DS_ACCELERATOR=cuda
timeout 180 "$PY" -m pytest -q -m gpu tests/unit/test_attention.py 2>&1 | tee "$OUT/pytest-gpu.txt" || true
timeout 240 "$PY" -m localopt_plugin.commands.bench speed --preset gpu-paper17 --repeats 5 \
  --warmup 2 --model-flags "--transformer-impl $TE" --json "$OUT/speed-gpu-paper17.json" \
  2>&1 | tee "$OUT/speed-gpu-paper17.txt" | tail -20
# Megatron-LM's own pretrain() with the plugin, 20 iterations on the embedded data, TE spec
# when TE is importable (the shards come from the embedded procedural videos)
"$PY" -m localopt_plugin.commands.preprocess procedural:64:0 --output "$OUT/shards" \
  --videos-per-shard 32 --no-progress > "$OUT/preprocess.txt" 2>&1
SEQ=$("$PY" -c "from localopt_plugin.data.wds import VideoWdsConfig, video_wds; \
print(video_wds(VideoWdsConfig(data_path=('$OUT/shards/train-{000000..000001}.tar',), \
num_workers=0)).layout.input_length)" 2>/dev/null | tail -n 1)
GPUS=1 MODEL=110m TRAIN_ITERS=20 MICRO_BATCH=4 GLOBAL_BATCH=8 SEQ_LENGTH=$SEQ PYTHON=$PY \
  TRANSFORMER_IMPL=$TE DATA_PATH="$OUT/shards/train-{000000..000001}.tar" \
  CHECKPOINTS="$OUT/megatron-lm-ckpt" timeout 240 bash megatron_configs/pretrain_video_gpt.sh \
  --lr-warmup-iters 2 --save-interval 100000 --data-num-workers 1 \
  > "$OUT/megatron-lm-pretrain.txt" 2>&1 || true
grep -E " iteration +[0-9]+/" "$OUT/megatron-lm-pretrain.txt" | tail -n 3
