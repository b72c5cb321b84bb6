#!/usr/bin/env bash
# A larger held-out split (train/tuning/held_out = 0.5/0.1/0.4 instead of 0.8/0.1/0.1), so that the shipped
# tasks are scored on four times the held-out patients: does the pretrained embedding beat five random-init
# controls when the comparison has the power to tell? (experiments/probe/RESULTS.md, section "A larger
# held-out set"). Run from the repository root; each step is skipped when its output is there.
#
#   bash experiments/probe/run_split40.sh                                    # Synthea 1k, synthea_inpatient_1y
#   DATA=gibleed OUT=runs/study_gibleed_split40 TASKS="gibleed_after_nsaid gibleed_after_osteoarthritis" \
#     bash experiments/probe/run_split40.sh
#
# A variant of the pretraining recipe: TAG names it, PRETRAIN_ARGS are its overrides. Its model is probed
# without random-init models (they do not depend on the pretrained weights) and compared with the five
# controls of the plain run in the same OUT, which must have run first:
#   TAG=_fc PRETRAIN_ARGS="task.module.future_codes_weight=0.3" bash experiments/probe/run_split40.sh
set -euo pipefail
DATA=${DATA:-synthea1k}
OUT=${OUT:-runs/study_synthea_split40}
TASKS=${TASKS:-synthea_inpatient_1y}
TAG=${TAG:-}
PRETRAIN_ARGS=${PRETRAIN_ARGS:-}
P=$OUT/prepared
M=$OUT/model$TAG
[[ -f $P/vocab.json ]] || cehrx task=prepare data=$DATA task.splits.train=0.5 task.splits.tuning=0.1 task.splits.held_out=0.4 output_dir=$P
# shellcheck disable=SC2086  # PRETRAIN_ARGS is a list of overrides
[[ -f $M/model/config.json ]] || cehrx task=pretrain data=$DATA model=tiny trainer=cpu data.prepared_dir=$P output_dir=$M logger=none $PRETRAIN_ARGS
if [[ -n $TAG ]]; then controls=(probe.random_init=false 'probe.baselines=[]'); else controls=(probe.random_init=true probe.random_init_seeds=5); fi
specs=()
for T in $TASKS; do
  for pooling in last mean; do
    D=$OUT/probe${TAG}_$pooling/$T
    [[ -f $D/metrics.json ]] || cehrx task=probe model_dir=$M data.prepared_dir=$P probe.task=$T probe.pooling=$pooling \
      "${controls[@]}" 'probe.few_shot=[]' output_dir=$D
    specs+=("$T, $pooling${TAG}=$D/predictions/probe.parquet:$OUT/probe_$pooling/$T")
  done
done
python experiments/probe/summarize.py $OUT/probe${TAG}_last
python experiments/probe/summarize.py $OUT/probe${TAG}_mean
python experiments/probe/paired.py "${specs[@]}"
