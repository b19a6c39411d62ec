#!/usr/bin/env bash
# The main job once per seed (SEEDS, default "1234 1235 1236"; each ~14 min on 2 CPU cores), then
# its figures over the seeds: runs/main-seeds.md (+ .json) with each run's values, mean, min
# and max and the machine. A run whose report exists is kept, so an interrupted sweep resumes.
# Other environment variables go to launch/main_job.sh (sizes, VARIANT ...).
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-.venv/bin/python}
SEEDS=${SEEDS:-"1234 1235 1236"}
BASE=${BASE:-runs/main-seed}
dirs=()
for seed in $SEEDS; do
  dirs+=("$BASE$seed")
  if [ -f "$BASE$seed/report.md" ]; then
    echo "seed $seed: $BASE$seed/report.md exists, kept"
    continue
  fi
  SEED=$seed OUT="$BASE$seed" bash launch/main_job.sh
done
"$PY" -m localopt_plugin.commands.report "${dirs[@]}" --spread "${SPREAD:-runs/main-seeds.md}"
