#!/usr/bin/env bash
# Fine-tuning study (experiments/finetune/RESULTS.md): full fine-tuning and LoRA vs the linear probe and
# counts, on Synthea 20k tasks, with the model of `cehrx experiment=synthea20k` (runs/synthea20k/model).
#
#   bash experiments/finetune/run_study.sh            # TASKS="synthea20k_inpatient_1y ..." METHODS="full lora" to choose
#   python experiments/finetune/summarize.py > tables.md
#
# One heavy job at a time; rerun the same command after an interruption (finished runs are skipped, a
# running one resumes from its last epoch). The histories are the probe study's (512 tokens, 15 % of the
# train/tuning labels), so the probe's feature store (runs/synthea20k/probe_cache) serves the probe baseline
# and the head's start. Budget: k = 1,024 training labels, 4 epochs at most; 1,000 tuning labels for early
# stopping; 3,000 held-out labels scored (every method on the same rows).
set -euo pipefail
main() {
cd "$(dirname "$0")/../.."
ROOT=${ROOT:-runs/synthea20k}
MODEL=${MODEL:-$ROOT/model}   # e.g. experiments/synthea20k/model (the committed model)
OUT=${OUT:-runs/finetune}
TASKS=${TASKS:-"synthea20k_inpatient_1y synthea20k_readmission_30d synthea20k_death_1y"}
METHODS=${METHODS:-"full lora"}
ARGS=${ARGS:-"probe.max_len=512 probe.train_label_fraction=0.15 probe.cache_dir=$ROOT/probe_cache probe.labels_cache_dir=$ROOT/labels_cache \
probe.progress=false finetune.few_shot=[1024] finetune.epochs=4 finetune.patience=2 finetune.max_tuning_labels=1000 \
finetune.max_test_labels=3000 finetune.progress=false"}
set -f
log() { echo "[$(date -u +%FT%TZ) load $(cut -d' ' -f1-3 /proc/loadavg)] $*"; }
for task in $TASKS; do
  for method in $METHODS; do
    out="$OUT/$method/$task"
    if [[ -f $out/metrics.json ]]; then log "done already: $out"; continue; fi
    log "start: $out"
    /usr/bin/time -f "  wall %e s, peak RSS %M KB" python -m cehrx task=finetune model_dir="$MODEL" probe.task="$task" \
      finetune.method="$method" $ARGS output_dir="$out"
    log "end: $out"
  done
done
}
main "$@"
exit
