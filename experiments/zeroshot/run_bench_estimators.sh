#!/usr/bin/env bash
# Issue 24's side-by-side benchmark: hazard vs Monte Carlo on the same futures, Synthea 20k tasks.
#
#   bash experiments/zeroshot/run_bench_estimators.sh [TASK...]
#
# Needs the model of `cehrx experiment=synthea20k` (runs/synthea20k/model) and its label cache.
# 10 runs x 10 futures per task (Monte Carlo with 100 futures = the 10 runs pooled). Resumable: a
# finished seed is reused. Results: runs/zeroshot_estimators/<task>/estimators.json (+ printed table).
set -euo pipefail
MODEL=${MODEL:-runs/synthea20k/model}
OUT=${OUT:-runs/zeroshot_estimators}
MAX_LABELS=${MAX_LABELS:-400}
REACH_SEEDS=${REACH_SEEDS:-0}   # also this many REACH runs (zeroshot.estimator=reach: own futures, same labels)
CONTROLS=${CONTROLS:-0}         # 1: the natural runs as zeroshot.estimator=hazard_cv (+ the hazard sum with control variates)
TASKS=${*:-synthea20k_death_1y synthea20k_ihd_3y synthea20k_t2d_3y}
for task in $TASKS; do
  echo "[$(date -u +%FT%TZ) load $(cut -d' ' -f1-3 /proc/loadavg)] start $task"
  python experiments/zeroshot/bench_estimators.py --model "$MODEL" --task "$task" --out "$OUT/$task" \
    --seeds 10 --futures 10 --max-labels "$MAX_LABELS" --reach-seeds "$REACH_SEEDS" \
    $([[ $CONTROLS == 1 ]] && echo --controls) -- \
    zeroshot.history_len=512 sampling.max_new_tokens=512 probe.labels_cache_dir=runs/synthea20k/labels_cache
  echo "[$(date -u +%FT%TZ) load $(cut -d' ' -f1-3 /proc/loadavg)] done $task"
done
