#!/usr/bin/env bash
# The main job on the embedded default data, end to end on 2 CPU ranks (or GPUs):
#   procedural class-conditional videos (the simple variant: 12 classes = 3 shapes x 4 motions,
#   two colours, each motion starting from its own place: 48 distinct clips)
#   -> fsq-video-simple tokens (the embedded tokenizer with the 136 ids those clips use)
#   -> webdataset shards
#   -> Local Optimization + ReCo training under DeepSpeed (2 ranks, ZeRO-1, preset "main":
#      4 layers x 128), with 10% of the conditions dropped for classifier-free guidance; ReCo in
#      the paper's form (squared L2 summed over the hidden size, lambda 0.1) on the residual
#      stream before the final norm, the form that kept NLL and smoothed the videos in the ReCo
#      sweep (docs/RESULTS.md)
#   -> full-context generation with guidance, two videos per class (mp4/GIF + grid)
#   -> class accuracy and Frechet distance by the embedded classifier, validation NLL per
#      frame (and with the null condition: does the model use its class?), flow consistency
#      -> report (runs/main/report.md + PNGs).
# Sizes are environment variables; the defaults finish within 15 minutes on 2 CPU cores.
# Extra arguments go to localopt-train (after the defaults, so they override them).
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-.venv/bin/python}
OUT=${OUT:-runs/main}
VARIANT=${VARIANT:-simple}         # procedural variant: plain, simple, calm or textured
VIDEOS=${VIDEOS:-960}              # training videos (17 frames, 64x64, 12 classes)
VALID_VIDEOS=${VALID_VIDEOS:-96}
VIDEOS_PER_SHARD=${VIDEOS_PER_SHARD:-64}
TRAIN_ITERS=${TRAIN_ITERS:-1350}
GEN_LABELS=${GEN_LABELS:-"0 1 2 3 4 5 6 7 8 9 10 11"}
GEN_PER_CLASS=${GEN_PER_CLASS:-2}  # generated videos per class
CFG_SCALE=${CFG_SCALE:-1.5}        # classifier-free guidance at generation
TEMPERATURE=${TEMPERATURE:-0.6}    # sampling temperature and top-k at generation
TOP_K=${TOP_K:-10}
NPROC=${NPROC:-2}
SEED=${SEED:-1234}                 # training (initialisation, data order, dropped conditions) and sampling
export OMP_NUM_THREADS=${OMP_NUM_THREADS:-1}
mkdir -p "$OUT"
DEFAULT_TOKENIZER=fsq-video
case "$VARIANT" in
  textured) KIND=procedural ;;
  calm|plain) KIND="procedural-$VARIANT" ;;
  # fsq-video cut to the 136 ids the simple clips use: a GPT output layer of 152 ids, not 5016
  simple) KIND=procedural-simple DEFAULT_TOKENIZER=fsq-video-simple ;;
  *) echo "error: VARIANT=$VARIANT: use plain, simple, calm or textured" >&2; exit 2 ;;
esac
TOKENIZER=${TOKENIZER:-$DEFAULT_TOKENIZER}
# sampling settings are checked now, by generation's own SamplingConfig, not after training
if ! err=$("$PY" -c "from localopt_plugin.generation.sampling import SamplingConfig
SamplingConfig(float('$TEMPERATURE'), int('$TOP_K'), 1.0, float('$CFG_SCALE'))" 2>&1); then
  echo "error: TEMPERATURE=$TEMPERATURE TOP_K=$TOP_K CFG_SCALE=$CFG_SCALE: ${err##*$'\n'}" >&2
  exit 2
fi
step() { printf '\n=== [%s/5] %s (%s)\n' "$1" "$2" "$(date +%T)"; }
last_shard() { printf '%06d' $(( ($1 + VIDEOS_PER_SHARD - 1) / VIDEOS_PER_SHARD - 1 )); }

step 1 "procedural videos ($VARIANT) -> $TOKENIZER tokens -> shards"
"$PY" -m localopt_plugin.commands.preprocess "$KIND:${VIDEOS}:0" --output "$OUT/shards/train" \
  --videos-per-shard "$VIDEOS_PER_SHARD" --tokenizer "$TOKENIZER"
"$PY" -m localopt_plugin.commands.preprocess "$KIND:${VALID_VIDEOS}:500000" \
  --output "$OUT/shards/valid" --videos-per-shard "$VIDEOS_PER_SHARD" --tokenizer "$TOKENIZER"
TRAIN_DATA="$OUT/shards/train/train-{000000..$(last_shard "$VIDEOS")}.tar"
VALID_DATA="$OUT/shards/valid/train-{000000..$(last_shard "$VALID_VIDEOS")}.tar"

step 2 "training: local-opt + ReCo, DeepSpeed ZeRO-1, $NPROC ranks"
rm -f "$OUT/metrics.jsonl"
"$PY" -m torch.distributed.run --standalone --nproc-per-node "$NPROC" -m localopt_plugin.commands.train \
  --deepspeed --deepspeed_config ds_configs/zero1.json \
  --preset main \
  --micro-batch-size 2 --global-batch-size 4 --train-iters "$TRAIN_ITERS" \
  --lr 2e-3 --min-lr 2e-4 --lr-decay-style cosine --lr-warmup-iters 30 --weight-decay 0.05 \
  --log-interval 50 --eval-interval 200 --eval-iters 4 \
  --save "$OUT/checkpoints" --save-interval "$TRAIN_ITERS" \
  --tensorboard-dir "$OUT/tensorboard" --metrics-file "$OUT/metrics.jsonl" \
  --dataset video-wds --data-path "$TRAIN_DATA" --valid-data-path "$VALID_DATA" \
  --data-num-workers 1 --null-condition-prob 0.1 \
  --objective local-opt --local-opt-window-frames 2 --local-opt-stride-frames 1 \
  --local-opt-first-window-prob 0.5 --regularizer reco --reco-weight 0.1 --reco-reduction sum \
  --reco-states pre-norm --seed "$SEED" \
  "$@"

step 3 "generation: $GEN_PER_CLASS videos per class, full context, guidance $CFG_SCALE, temperature $TEMPERATURE, top-k $TOP_K"
rm -rf "$OUT/samples"
"$PY" -m localopt_plugin.commands.generate --checkpoint "$OUT/checkpoints" --out "$OUT/samples" \
  --class-labels $GEN_LABELS --samples-per-condition "$GEN_PER_CLASS" --cfg-scale "$CFG_SCALE" \
  --top-k "$TOP_K" --temperature "$TEMPERATURE" --seed "$SEED" --batch-size 24

step 4 "evaluation: classes of the samples, NLL per frame on validation shards, flow"
"$PY" -m localopt_plugin.commands.evaluate classes "$OUT/samples" --background "$VARIANT" \
  --tokenizer "$TOKENIZER" --out "$OUT/eval/classes.json"
"$PY" -m localopt_plugin.commands.evaluate nll --checkpoint "$OUT/checkpoints" \
  --data-path "$VALID_DATA" --num-samples 32 --condition-check --out "$OUT/eval/nll.json" --plot "$OUT/eval/nll.png"
"$PY" -m localopt_plugin.commands.evaluate flow "$OUT/samples" --out "$OUT/eval/flow.json"

step 5 "report"
"$PY" -m localopt_plugin.commands.report "$OUT"
echo "done: $OUT/report.md"
