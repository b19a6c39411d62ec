#!/usr/bin/env bash
# Many nodes through DeepSpeed's launcher and a hostfile ("host slots=8" per line). Example:
#   DATA_PATH=... MODEL=770m HOSTFILE=hostfile TP=2 bash launch/train_multi_node.sh
set -euo pipefail
cd "$(dirname "$0")/.."
HOSTFILE=${HOSTFILE:-hostfile}
source launch/common.sh
if [ "${DRY_RUN:-0}" = 1 ]; then
  world=0
  if [ -f "$HOSTFILE" ]; then
    world=$(awk '{for (i = 1; i <= NF; i++) if ($i ~ /^slots=/) {split($i, a, "="); s += a[2]}}
                 END {print s + 0}' "$HOSTFILE")
  fi
  dry_run_or_exec "${WORLD:-$world}" "$@"
fi
# The deepspeed launcher leaves OMP_NUM_THREADS unset; one thread per rank avoids contention.
export OMP_NUM_THREADS=${OMP_NUM_THREADS:-1}
exec deepspeed --hostfile "$HOSTFILE" --module localopt_plugin.commands.train "${ALL_ARGS[@]}" "$@"
