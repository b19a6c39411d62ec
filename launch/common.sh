# Sourced by the launch scripts of localopt-train: the model preset and the plugin's flags, as
# bash arrays (TP, PP, CP: tensor, pipeline and context parallel sizes). MODEL=110m|770m|tiny|... picks a preset of localopt_plugin/model/presets.py (the
# paper's two sizes; tiny for CPU smoke runs); extra flags given to a script override it.
# Everything here is an ordinary Megatron-LM flag except --preset and PLUGIN_ARGS.

MODEL_ARGS=(--preset "${MODEL:-110m}")

DATA_ARGS=(--dataset video-wds --data-path ${DATA_PATH:?set DATA_PATH to the shards (see docs/data-format.md)})
[ -n "${VALID_DATA_PATH:-}" ] && DATA_ARGS+=(--valid-data-path ${VALID_DATA_PATH})

TRAIN_ARGS=(
  --micro-batch-size ${MICRO_BATCH:-4} --global-batch-size ${GLOBAL_BATCH:-256}
  --train-iters ${TRAIN_ITERS:-100000} --lr ${LR:-3e-4} --min-lr 3e-5
  --lr-decay-style cosine --lr-warmup-iters 2000 --weight-decay 0.05 --clip-grad 1.0
  --adam-beta1 0.9 --adam-beta2 0.95 --seed ${SEED:-1234}
  --tensor-model-parallel-size ${TP:-1} --pipeline-model-parallel-size ${PP:-1}
)
# CP=N: each sample's tokens split over N ranks, attention head-sharded (all-to-all)
[ "${CP:-1}" != 1 ] && TRAIN_ARGS+=(--context-parallel-size ${CP} --cp-comm-type a2a)
[ "${BF16:-1}" = 1 ] && TRAIN_ARGS+=(--bf16)

OUTPUT_ARGS=(
  --log-interval 10 --eval-interval 1000 --eval-iters 20
  --save ${CHECKPOINTS:-checkpoints/${MODEL:-110m}} --load ${CHECKPOINTS:-checkpoints/${MODEL:-110m}}
  --save-interval 1000 --tensorboard-dir ${TENSORBOARD:-tensorboard/${MODEL:-110m}}
)

# The plugin: Local Optimization with first-frame balanced windows, and ReCo in the form the
# ReCo sweep found (the paper's sum and lambda on the final norm's input; the defaults).
PLUGIN_ARGS=(
  --objective local-opt --local-opt-window-frames ${WINDOW_FRAMES:-2}
  --local-opt-stride-frames ${STRIDE_FRAMES:-1} --local-opt-first-window-prob 0.5
  --regularizer reco --reco-weight 0.1 --reco-reduction sum --reco-states pre-norm
)

DS_ARGS=(--deepspeed --deepspeed_config ${DS_CONFIG:-ds_configs/zero1_bf16.json})
[ "${BF16:-1}" = 1 ] || DS_ARGS=(--deepspeed --deepspeed_config ${DS_CONFIG:-ds_configs/zero1.json})

ALL_ARGS=("${MODEL_ARGS[@]}" "${DATA_ARGS[@]}" "${TRAIN_ARGS[@]}" "${OUTPUT_ARGS[@]}"
          "${PLUGIN_ARGS[@]}" "${DS_ARGS[@]}")

# DRY_RUN=1: validate every flag, the DeepSpeed JSON and the data manifest for the intended
# world size, print the resolved setup, and exit without launching anything.
dry_run_or_exec() {
  if [ "${DRY_RUN:-0}" = 1 ]; then
    WORLD_SIZE=$1 exec "${PYTHON:-python}" -m localopt_plugin.commands.train "${ALL_ARGS[@]}" --dry-run "${@:2}"
  fi
}
