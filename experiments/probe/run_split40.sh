#!/usr/bin/env bash
# Synthea 1k with a larger held-out split (train/tuning/held_out = 0.5/0.1/0.4 instead of 0.8/0.1/0.1), so that
# `synthea_inpatient_1y` is scored on ~430 held-out patients instead of ~110: does the pretrained embedding beat
# five random-init controls when the comparison has the power to tell? (experiments/probe/RESULTS.md, section
# "A larger held-out set on Synthea 1k"). Run from the repository root.
#
#   bash experiments/probe/run_split40.sh
set -euo pipefail
OUT=${OUT:-runs/study_synthea_split40}
P=$OUT/prepared
# each step is skipped when its output is there (rerun after an interruption)
[[ -f $P/vocab.json ]] || cehrx task=prepare data=synthea1k task.splits.train=0.5 task.splits.tuning=0.1 task.splits.held_out=0.4 output_dir=$P
[[ -f $OUT/model/model/config.json ]] || cehrx task=pretrain data=synthea1k model=tiny trainer=cpu data.prepared_dir=$P output_dir=$OUT/model logger=none
for pooling in last mean; do
  [[ -f $OUT/probe_$pooling/synthea_inpatient_1y/metrics.json ]] || cehrx task=probe model_dir=$OUT/model data.prepared_dir=$P probe.task=synthea_inpatient_1y probe.pooling=$pooling \
    probe.random_init=true probe.random_init_seeds=5 'probe.few_shot=[]' output_dir=$OUT/probe_$pooling/synthea_inpatient_1y
done
python experiments/probe/summarize.py $OUT/probe_last
python experiments/probe/summarize.py $OUT/probe_mean
T=synthea_inpatient_1y
python experiments/probe/paired.py "last token=$OUT/probe_last/$T/predictions/probe.parquet:$OUT/probe_last/$T" \
  "mean pooling=$OUT/probe_mean/$T/predictions/probe.parquet:$OUT/probe_mean/$T"
