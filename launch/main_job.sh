#!/usr/bin/env bash
# The main job on the embedded default data, end to end on 2 CPU ranks (or GPUs):
#   procedural class-conditional videos -> embedded fsq-video tokenizer -> webdataset shards
#   -> Local Optimization + ReCo training under DeepSpeed (2 ranks, ZeRO-1)
#   -> full-context generation (GIF/mp4 + grid) -> validation NLL per frame, flow consistency
#   -> report (runs/main/report.md + PNGs).
# Sizes are environment variables; the defaults finish well within 20 minutes on 2 CPU cores.
# Extra arguments go to localopt-train (after the defaults, so they override them).
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-.venv/bin/python}
OUT=${OUT:-runs/main}
VIDEOS=${VIDEOS:-960}              # training videos (17 frames, 64x64, 12 classes)
VALID_VIDEOS=${VALID_VIDEOS:-96}
VIDEOS_PER_SHARD=${VIDEOS_PER_SHARD:-64}
TRAIN_ITERS=${TRAIN_ITERS:-400}
GEN_LABELS=${GEN_LABELS:-"0 1 2 3 4 5 6 7 8 9 10 11"}  # one generated video per class
NPROC=${NPROC:-2}
export OMP_NUM_THREADS=${OMP_NUM_THREADS:-1}
mkdir -p "$OUT"
step() { printf '\n=== [%s/5] %s (%s)\n' "$1" "$2" "$(date +%T)"; }
last_shard() { printf '%06d' $(( ($1 + VIDEOS_PER_SHARD - 1) / VIDEOS_PER_SHARD - 1 )); }

step 1 "procedural videos -> fsq-video tokens -> shards"
"$PY" -m localopt_plugin.commands.preprocess "procedural:${VIDEOS}:0" --output "$OUT/shards/train" \
  --videos-per-shard "$VIDEOS_PER_SHARD"
"$PY" -m localopt_plugin.commands.preprocess "procedural:${VALID_VIDEOS}:500000" \
  --output "$OUT/shards/valid" --videos-per-shard "$VIDEOS_PER_SHARD"
TRAIN_DATA="$OUT/shards/train/train-{000000..$(last_shard "$VIDEOS")}.tar"
VALID_DATA="$OUT/shards/valid/train-{000000..$(last_shard "$VALID_VIDEOS")}.tar"

step 2 "training: local-opt + ReCo, DeepSpeed ZeRO-1, $NPROC ranks"
rm -f "$OUT/metrics.jsonl"
"$PY" -m torch.distributed.run --standalone --nproc-per-node "$NPROC" -m localopt_plugin.commands.train \
  --deepspeed --deepspeed_config ds_configs/zero1.json \
  --preset main \
  --micro-batch-size 4 --global-batch-size 8 --train-iters "$TRAIN_ITERS" \
  --lr 2e-3 --min-lr 2e-4 --lr-decay-style cosine --lr-warmup-iters 30 --weight-decay 0.05 \
  --log-interval 20 --eval-interval 100 --eval-iters 4 \
  --save "$OUT/checkpoints" --save-interval 200 \
  --tensorboard-dir "$OUT/tensorboard" --metrics-file "$OUT/metrics.jsonl" \
  --dataset video-wds --data-path "$TRAIN_DATA" --valid-data-path "$VALID_DATA" \
  --data-num-workers 1 \
  --objective local-opt --local-opt-window-frames 2 --local-opt-stride-frames 1 \
  --local-opt-first-window-prob 0.5 --regularizer reco --reco-weight 0.1 --reco-reduction mean \
  "$@"

step 3 "generation: one video per class, full context"
"$PY" -m localopt_plugin.commands.generate --checkpoint "$OUT/checkpoints" --out "$OUT/samples" \
  --class-labels $GEN_LABELS --top-k 50 --temperature 1.0 --seed 0

step 4 "evaluation: NLL per frame on validation shards, flow consistency of the samples"
"$PY" -m localopt_plugin.commands.evaluate nll --checkpoint "$OUT/checkpoints" \
  --data-path "$VALID_DATA" --num-samples 32 --out "$OUT/eval/nll.json" --plot "$OUT/eval/nll.png"
"$PY" -m localopt_plugin.commands.evaluate flow "$OUT/samples" --out "$OUT/eval/flow.json"

step 5 "report"
"$PY" -m localopt_plugin.commands.report "$OUT"
echo "done: $OUT/report.md"
