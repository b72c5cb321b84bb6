#!/usr/bin/env bash
# The pretrain recipe plus the future-codes head (task.module.future_codes_weight: FC_WEIGHT, default 0.3)
# against the controls of the earlier studies (experiments/probe/RESULTS.md, section "The future-codes head"). Each model is
# probed without random-init models: those do not depend on the pretrained weights, so the five controls of
# the plain-recipe run on the same prepared data and labels are reused, paired subject by subject.
# Run from the repository root after run_split40.sh (both data sets), run.sh and run_other_tasks.sh;
# each step is skipped when its output is there.
set -euo pipefail
FC="task.module.future_codes_weight=${FC_WEIGHT:-0.3}"
probe() {  # model_dir prepared task output_dir [overrides...]
  local m=$1 p=$2 t=$3 d=$4; shift 4
  [[ -f $d/metrics.json ]] || cehrx task=probe model_dir=$m data.prepared_dir=$p probe.task=$t probe.random_init=false \
    'probe.baselines=[]' 'probe.few_shot=[]' output_dir=$d "$@"
}
# 1. 40 % held-out splits (the powered comparison), both readouts
DATA=gibleed OUT=runs/study_gibleed_split40 TASKS="gibleed_after_nsaid gibleed_after_osteoarthritis" TAG=_fc PRETRAIN_ARGS=$FC \
  bash experiments/probe/run_split40.sh
TAG=_fc PRETRAIN_ARGS=$FC bash experiments/probe/run_split40.sh                      # Synthea 1k, synthea_inpatient_1y
# 2. the default 80/10/10 splits: GiBleed (probe and zero-shot), Synthea 1k, MIMIC-IV demo
P=runs/study_gibleed/prepared M=runs/study_gibleed_fc/model
[[ -f $M/model/config.json ]] || cehrx task=pretrain data=gibleed model=tiny trainer=cpu data.prepared_dir=$P output_dir=$M logger=none $FC
specs=()
for T in gibleed_after_nsaid gibleed_after_osteoarthritis; do
  probe $M $P $T runs/study_gibleed_fc/probe/$T
  specs+=("$T=runs/study_gibleed_fc/probe/$T/predictions/probe.parquet:runs/study_gibleed/probe/$T")
  D=runs/study_gibleed_fc/zeroshot/$T
  [[ -f $D/metrics.json ]] || cehrx task=zeroshot model_dir=$M probe.task=$T split=held_out zeroshot.num_samples=20 output_dir=$D
done
P=runs/synthea1k_pipeline/prepared M=runs/study_synthea_fc/model
[[ -f $M/model/config.json ]] || cehrx task=pretrain data=synthea1k model=tiny trainer=cpu data.prepared_dir=$P output_dir=$M logger=none $FC
for T in synthea_readmission_30d synthea_inpatient_1y; do
  probe $M $P $T runs/study_synthea_fc/probe/$T
  specs+=("$T=runs/study_synthea_fc/probe/$T/predictions/probe.parquet:runs/study_synthea/probe/$T")
done
P=runs/study_mimic/prepared M=runs/study_mimic_fc/model T=mimic_icu_mortality
[[ -f $M/model/config.json ]] || cehrx task=pretrain data=mimic_demo model=tiny trainer=cpu data.prepared_dir=$P output_dir=$M \
  trainer.max_steps=400 model.max_seq_len=1024 logger=none $FC
probe $M $P $T runs/study_mimic_fc/probe/$T
specs+=("$T=runs/study_mimic_fc/probe/$T/predictions/probe.parquet:runs/study_mimic/probe/$T")
python experiments/probe/paired.py "${specs[@]}"
python experiments/zeroshot/summarize.py runs/study_gibleed_fc/zeroshot
