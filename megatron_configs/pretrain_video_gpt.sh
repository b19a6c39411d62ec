#!/usr/bin/env bash
# Megatron-LM's own pretrain() with the plugin (examples/pretrain_video_gpt.py), one node. Example:
#   DATA_PATH="shards/train-{000000..000099}.tar" SEQ_LENGTH=1283 MODEL=110m GPUS=8 \
#     bash megatron_configs/pretrain_video_gpt.sh
# Needs megatron.training (megatron-core >= 0.17, Python >= 3.12: tools/setup_megatron_lm_env.sh).
# SEQ_LENGTH is the shards' input length (the trainer says so if it differs; with CP=N context
# parallelism, the next multiple of 2N: Megatron-LM wants one). On a machine
# without CUDA set CPU=1 (gloo, no fused kernels, no gradient clipping: see docs/megatron-lm.md).
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-.venv312/bin/python}
GPUS=${GPUS:-8}
MODEL_ARGS=($("$PY" -m localopt_plugin.model.presets "${MODEL:-110m}" 2>/dev/null))
DATA_ARGS=(--dataset video-wds --dataloader-type external
           --seq-length "${SEQ_LENGTH:?set SEQ_LENGTH to the input length of the shards}"
           --max-position-embeddings "$SEQ_LENGTH"
           --tokenizer-type NullTokenizer --vocab-size 8)  # the model's vocabulary is the data's
if [ -n "${VALID_DATA_PATH:-}" ]; then
  DATA_ARGS+=(--train-data-path ${DATA_PATH:?set DATA_PATH} --valid-data-path ${VALID_DATA_PATH})
else
  DATA_ARGS+=(--data-path ${DATA_PATH:?set DATA_PATH})
fi
TRAIN_ARGS=(
  --micro-batch-size ${MICRO_BATCH:-4} --global-batch-size ${GLOBAL_BATCH:-256}
  --train-iters ${TRAIN_ITERS:-100000} --lr ${LR:-3e-4} --min-lr 3e-5 --lr-decay-style cosine
  --lr-warmup-iters 2000 --weight-decay 0.05 --adam-beta1 0.9 --adam-beta2 0.95
  --tensor-model-parallel-size ${TP:-1} --transformer-impl ${TRANSFORMER_IMPL:-local}
  --context-parallel-size ${CP:-1} --cp-comm-type a2a
  --eval-interval 1000 --eval-iters 20 --log-interval 10
  --save ${CHECKPOINTS:-checkpoints/megatron-lm-${MODEL:-110m}} --save-interval 1000
)
PLUGIN_ARGS=(
  --objective local-opt --local-opt-window-frames ${WINDOW_FRAMES:-2}
  --local-opt-first-window-prob 0.5 --regularizer reco --reco-weight 0.1 --reco-reduction sum
  --reco-states pre-norm
)
if [ "${CPU:-0}" = 1 ]; then
  TRAIN_ARGS+=(--distributed-backend gloo --clip-grad 0 --no-persist-layer-norm
               --no-masked-softmax-fusion --no-bias-gelu-fusion --no-bias-swiglu-fusion
               --no-bias-dropout-fusion --no-gradient-accumulation-fusion --no-rope-fusion)
else
  TRAIN_ARGS+=(--bf16 --clip-grad 1.0)
  # Megatron-LM's fusions whose kernels this machine lacks (the plugin refuses them by name)
  has() { "$PY" -c "import $1" 2>/dev/null; }
  has transformer_engine || TRAIN_ARGS+=(--no-rope-fusion)
  if [ "${TRANSFORMER_IMPL:-local}" = local ]; then
    has apex || TRAIN_ARGS+=(--no-persist-layer-norm)
    has fused_weight_gradient_mlp_cuda || TRAIN_ARGS+=(--no-gradient-accumulation-fusion)
  fi
fi
export CUDA_DEVICE_MAX_CONNECTIONS=1  # Megatron-LM's setting for tensor parallelism
exec "$PY" -m torch.distributed.run --standalone --nproc-per-node "$GPUS" \
  examples/pretrain_video_gpt.py "${MODEL_ARGS[@]}" "${DATA_ARGS[@]}" "${TRAIN_ARGS[@]}" \
  "${PLUGIN_ARGS[@]}" "$@"
