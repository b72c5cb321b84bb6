#!/usr/bin/env bash
# Pretraining-run variance (experiments/probe/RESULTS.md, section "Three pretraining seeds"): the probing
# recipe (tiny, the pretrain schedule, future-codes head at weight 0.3) pretrained with seeds 42, 43 and 44,
# each probed with the last-token readout and compared with the same five random-init controls (seeds 42-46
# of the probe; they do not depend on the pretrained weights, so they are run once, beside the first
# seed's probe). Run from the repository root; each step is skipped when its output is there.
#
#   bash experiments/probe/run_pretrain_seeds.sh                 # default splits: Synthea 1k, MIMIC-IV demo
#   STUDIES=synthea1k_split40 bash experiments/probe/run_pretrain_seeds.sh   # Synthea, 40 % held out
#   FC_WEIGHT=0 OUT=runs/study_seeds_plain STUDIES=mimic_demo bash experiments/probe/run_pretrain_seeds.sh   # plain recipe
set -euo pipefail
FC=task.module.future_codes_weight=${FC_WEIGHT:-0.3}
SEEDS=${SEEDS:-42 43 44}
FIRST=${SEEDS%% *}
OUT=${OUT:-runs/study_seeds}
STUDIES=${STUDIES:-synthea1k mimic_demo}
SPLIT40=(task.splits.train=0.5 task.splits.tuning=0.1 task.splits.held_out=0.4)

study() {  # name, data, tasks, prepare overrides (a bash array name), pretrain overrides...
  local name=$1 data=$2 tasks=$3 prep="$4[@]"; shift 4
  local P=$OUT/$name/prepared specs=()
  [[ -f $P/vocab.json ]] || cehrx task=prepare data="$data" output_dir="$P" "${!prep}"
  for s in $SEEDS; do
    local M=$OUT/$name/model_s$s
    [[ -f $M/model/config.json ]] || cehrx task=pretrain data="$data" model=tiny trainer=cpu data.prepared_dir="$P" \
      output_dir="$M" logger=none seed="$s" "$FC" "$@"
  done
  for T in $tasks; do
    local C=$OUT/$name/controls/$T probes=()
    [[ -f $C/metrics.json ]] || cehrx task=probe model_dir="$OUT/$name/model_s$FIRST" data.prepared_dir="$P" probe.task="$T" \
      probe.random_init=true probe.random_init_seeds=5 'probe.few_shot=[]' output_dir="$C"
    for s in $SEEDS; do
      local D=$OUT/$name/probe_s$s/$T
      [[ $s == "$FIRST" ]] && D=$C  # its probe is the controls' run
      [[ -f $D/metrics.json ]] || cehrx task=probe model_dir="$OUT/$name/model_s$s" data.prepared_dir="$P" probe.task="$T" \
        probe.random_init=false 'probe.baselines=[]' 'probe.few_shot=[]' output_dir="$D"
      probes+=("$D/predictions/probe.parquet")
    done
    specs+=("$name $T=$(IFS=,; echo "${probes[*]}"):$C")
  done
  python experiments/probe/paired.py "${specs[@]}"
}

NONE=()
for S in $STUDIES; do
  case $S in
    synthea1k) study synthea1k synthea1k "synthea_inpatient_1y synthea_readmission_30d" NONE ;;
    synthea1k_split40) study synthea1k_split40 synthea1k synthea_inpatient_1y SPLIT40 ;;
    mimic_demo) study mimic_demo mimic_demo mimic_icu_mortality NONE trainer.max_steps=400 model.max_seq_len=1024 ;;
    *) echo "unknown study $S (synthea1k | synthea1k_split40 | mimic_demo)" >&2; exit 2 ;;
  esac
done
