#!/usr/bin/env bash
# A one-minute smoke run: a small video GPT trained with Local Optimization on the built-in
# synthetic class-conditional video tokens, 2 data-parallel ranks, DeepSpeed ZeRO-1.
# Megatron-LM flags, plus the plugin's flags at the end.
# Usage: bash launch/train_synthetic_2rank.sh [extra localopt-train flags]
set -euo pipefail
cd "$(dirname "$0")/.."
NPROC=${NPROC:-2}
OUT=${OUT:-runs/synthetic}
mkdir -p "$OUT"
export OMP_NUM_THREADS=${OMP_NUM_THREADS:-1}

MODEL_ARGS=(--preset tiny)
TRAIN_ARGS=(
  --micro-batch-size 4 --global-batch-size 8 --train-iters ${TRAIN_ITERS:-300}
  --lr 1e-3 --min-lr 1e-4 --lr-decay-style cosine --lr-warmup-iters 20
  --weight-decay 0.05 --clip-grad 1.0 --seed 1234
)
OUTPUT_ARGS=(
  --log-interval 25 --eval-interval 100 --eval-iters 4
  --save "$OUT/checkpoints" --save-interval 100
  --tensorboard-dir "$OUT/tensorboard" --metrics-file "$OUT/metrics.jsonl"
)
PLUGIN_ARGS=(
  --dataset synthetic-video-tokens --synthetic-frames 5 --synthetic-frame-tokens 64
  --objective local-opt --local-opt-window-frames 2 --local-opt-stride-frames 1
  --local-opt-first-window-prob 0.5
)

exec "${PYTHON:-.venv/bin/python}" -m torch.distributed.run --standalone --nproc-per-node "$NPROC" \
  -m localopt_plugin.commands.train --deepspeed --deepspeed_config ds_configs/zero1.json \
  "${MODEL_ARGS[@]}" "${TRAIN_ARGS[@]}" "${OUTPUT_ARGS[@]}" "${PLUGIN_ARGS[@]}" "$@"
