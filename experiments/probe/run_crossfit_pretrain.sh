#!/usr/bin/env bash
# Cross-fitted pretraining (experiments/probe/RESULTS.md, section "Every patient held out once"): the
# largest fair test of "pretrained beats random init" that a small data set allows. Subjects are cut
# into K folds; for each fold a model is pretrained (tiny, the pretrain schedule, future-codes head at
# 0.3) on the other folds only, and the probe (classifier fitted on the other folds' labels, five
# random-init controls of the same architecture) scores that fold. Pooling the K held-out folds puts
# every patient's labels in the comparison, each scored by a model that never read that patient.
#
#   bash experiments/probe/run_crossfit_pretrain.sh                      # Synthea 1k, inpatient within 1 y, K=4
#   K=5 OUT=runs/study_crossfit5 bash experiments/probe/run_crossfit_pretrain.sh
#
# Each step is skipped when its output is there. Run from the repository root.
set -euo pipefail
K=${K:-4}
OUT=${OUT:-runs/study_crossfit}
DATA=${DATA:-synthea1k}
TASK=${TASK:-synthea_inpatient_1y}
FC=task.module.future_codes_weight=${FC_WEIGHT:-0.3}

# All subject ids: from a default prepare's MEDS splits (seconds).
[[ -f $OUT/all/prepared/vocab.json ]] || cehrx task=prepare data="$DATA" output_dir="$OUT/all/prepared"
python - "$OUT" "$K" <<'PY'
import sys
from pathlib import Path

import duckdb

out, k = Path(sys.argv[1]), int(sys.argv[2])
src = out / "all" / "prepared" / "meds" / "metadata" / "subject_splits.parquet"
tuning = round(100 * k / (k - 1))  # per mille of the other folds: 10 % of all subjects, as in the default split
for fold in range(k):  # fold by md5 of the subject
    f = out / f"fold{fold}" / "subject_splits.parquet"
    if f.is_file():
        continue
    f.parent.mkdir(parents=True, exist_ok=True)
    duckdb.sql(f"""
        COPY (SELECT subject_id, CASE WHEN md5_number('fold/' || subject_id) % {k} = {fold} THEN 'held_out'
                                      WHEN md5_number('tuning/' || subject_id) % 1000 < {tuning}
                                      THEN 'tuning' ELSE 'train' END AS split
              FROM read_parquet('{src}') ORDER BY subject_id) TO '{f}' (FORMAT parquet)
    """)
PY

probes=()
for ((f = 0; f < K; f++)); do
  D=$OUT/fold$f
  [[ -f $D/prepared/vocab.json ]] || cehrx task=prepare data="$DATA" output_dir="$D/prepared" task.splits.file="$D/subject_splits.parquet"
  [[ -f $D/model/model/config.json ]] || cehrx task=pretrain data="$DATA" model=tiny trainer=cpu data.prepared_dir="$D/prepared" \
    output_dir="$D/model" logger=none seed=42 "$FC"
  [[ -f $D/probe/$TASK/metrics.json ]] || cehrx task=probe model_dir="$D/model" data.prepared_dir="$D/prepared" probe.task="$TASK" \
    probe.evaluation=split probe.random_init=true probe.random_init_seeds=5 'probe.few_shot=[]' output_dir="$D/probe/$TASK"
  probes+=("$D/probe/$TASK")
done
python experiments/probe/pool_folds.py "$OUT/pooled/$TASK" "${probes[@]}"
python experiments/probe/paired.py "$DATA $TASK, pooled over $K folds=$OUT/pooled/$TASK/predictions/probe.parquet:$OUT/pooled/$TASK"
