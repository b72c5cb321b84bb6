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
#   POOLING=mean bash experiments/probe/run_crossfit_pretrain.sh        # the same models, mean-pooled readout
#   TASK=synthea_readmission_30d bash experiments/probe/run_crossfit_pretrain.sh   # the same models, another task
#   DATA=mimic_demo TASK=mimic_icu_mortality OUT=runs/study_crossfit_mimic FC_WEIGHT=0 \
#     PRETRAIN_ARGS="trainer.max_steps=400 model.max_seq_len=1024" bash experiments/probe/run_crossfit_pretrain.sh
#
# Each step is skipped when its output is there. Run from the repository root.
set -euo pipefail
K=${K:-4}
OUT=${OUT:-runs/study_crossfit}
DATA=${DATA:-synthea1k}
TASK=${TASK:-synthea_inpatient_1y}
FC=task.module.future_codes_weight=${FC_WEIGHT:-0.3}
POOLING=${POOLING:-last}
read -ra PRETRAIN_ARGS <<< "${PRETRAIN_ARGS:-}"   # extra pretrain overrides (an experiment's schedule)
PROBE=probe; [[ $POOLING == last ]] || PROBE=probe_$POOLING   # the last-token runs keep their original paths

# All subject ids: those with a sequence in a default prepare (seconds; any source).
[[ -f $OUT/all/prepared/vocab.json ]] || cehrx task=prepare data="$DATA" output_dir="$OUT/all/prepared"
python - "$OUT" "$K" <<'PY'
import sys
from pathlib import Path

import duckdb

out, k = Path(sys.argv[1]), int(sys.argv[2])
src = out / "all" / "prepared" / "tokens" / "*" / "*.parquet"
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
              FROM (SELECT DISTINCT subject_id FROM read_parquet('{src}')) ORDER BY subject_id) TO '{f}' (FORMAT parquet)
    """)
PY

probes=()
for ((f = 0; f < K; f++)); do
  D=$OUT/fold$f
  [[ -f $D/prepared/vocab.json ]] || cehrx task=prepare data="$DATA" output_dir="$D/prepared" task.splits.file="$D/subject_splits.parquet"
  [[ -f $D/model/model/config.json ]] || cehrx task=pretrain data="$DATA" model=tiny trainer=cpu data.prepared_dir="$D/prepared" \
    output_dir="$D/model" logger=none seed=42 "$FC" "${PRETRAIN_ARGS[@]}"
  [[ -f $D/$PROBE/$TASK/metrics.json ]] || cehrx task=probe model_dir="$D/model" data.prepared_dir="$D/prepared" probe.task="$TASK" \
    probe.evaluation=split probe.pooling="$POOLING" probe.random_init=true probe.random_init_seeds=5 'probe.few_shot=[]' \
    output_dir="$D/$PROBE/$TASK"
  probes+=("$D/$PROBE/$TASK")
done
POOLED=$OUT/pooled; [[ $POOLING == last ]] || POOLED=$OUT/pooled_$POOLING
python experiments/probe/pool_folds.py "$POOLED/$TASK" "${probes[@]}"
python experiments/probe/paired.py "$DATA $TASK, $POOLING, pooled over $K folds=$POOLED/$TASK/predictions/probe.parquet:$POOLED/$TASK"
