#!/usr/bin/env bash
# One node, GPUS processes (torchrun). Example:
#   DATA_PATH="data/shards/train-{000000..000099}.tar" MODEL=110m GPUS=8 \
#     bash launch/train_single_node.sh
set -euo pipefail
cd "$(dirname "$0")/.."
GPUS=${GPUS:-8}
source launch/common.sh
dry_run_or_exec "$GPUS" "$@"
exec torchrun --standalone --nproc-per-node "$GPUS" -m localopt_plugin.commands.train "${ALL_ARGS[@]}" "$@"
