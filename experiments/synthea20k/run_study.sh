#!/usr/bin/env bash
# The Synthea 20k study (experiments/synthea20k/RESULTS.md): every shipped synthea20k_* task.
#
#   bash experiments/synthea20k/run_study.sh [probe|window|zeroshot|synthetic|all]     (default: all)
#
# Needs the model of `cehrx experiment=synthea20k` (runs/synthea20k/model). Runs one heavy job at a
# time; rerun the same command after an interruption: finished runs are skipped, the probe's feature
# store (runs/synthea20k/probe_cache) keeps every history already embedded, zero-shot keeps its chunks.
# Then: python experiments/synthea20k/summarize.py > tables.md
set -euo pipefail
# The body is one function, parsed whole before it runs: editing this file while a study runs (hours)
# cannot change what the running study does (bash otherwise reads scripts as it goes).
main() {
cd "$(dirname "$0")/../.."

ROOT=${ROOT:-runs/synthea20k}
MODEL=${MODEL:-$ROOT/model}
STUDY=${STUDY:-$ROOT/study}
TASKS=${TASKS:-$(ls configs/aces/synthea20k_*.yaml | xargs -n1 basename | sed 's/\.yaml$//')}
LABELS="probe.labels_cache_dir=$ROOT/labels_cache"  # each task's ACES labels are extracted once for all its runs
# Probe: 512-token histories, 1 random-init seed (each seed costs as much as the pretrained model:
# ~20 min per 48k histories here), 15 % of the train/tuning labels (a fixed hash of subject and time, so
# every task keeps the same prediction times and the feature store serves them all); held_out is never thinned.
PROBE_ARGS=${PROBE_ARGS:-"probe.max_len=512 probe.random_init=true probe.random_init_seeds=1 probe.train_label_fraction=0.15 \
probe.cache_dir=$ROOT/probe_cache probe.few_shot=[16,64,256,1024,all] probe.progress=false $LABELS"}
# Zero-shot: 10 futures of up to 512 new tokens after a 512-token history, on 400 held-out labels: 200
# positive labels plus 200 negatives, weighted back to the whole held-out split (label_sample). Both
# estimators (Monte Carlo count, hazard sum) come from the same futures.
ZS_ARGS=${ZS_ARGS:-"zeroshot.num_samples=10 sampling.max_new_tokens=512 zeroshot.history_len=512 zeroshot.max_labels=400 \
zeroshot.label_sample=case_control zeroshot.progress=false $LABELS"}
WHAT=${1:-all}
set -f  # from here on no globbing: probe.few_shot=[...] is an override, not a pattern

log() { echo "[$(date -u +%FT%TZ) load $(cut -d' ' -f1-3 /proc/loadavg)] $*"; }
run() {  # run OUT_DIR CMD...: skip when OUT_DIR/metrics.json exists
  local out=$1; shift
  if [[ -f $out/metrics.json ]]; then log "done already: $out"; return; fi
  log "start: $out"
  /usr/bin/time -f "  wall %e s, peak RSS %M KB" "$@" output_dir="$out"
  log "end: $out"
}

if [[ $WHAT == probe || $WHAT == all ]]; then
  for task in $TASKS; do
    run "$STUDY/probe_last/$task" python -m cehrx task=probe model_dir="$MODEL" probe.task="$task" probe.pooling=last $PROBE_ARGS
    # the mean readout: the same histories (read from the feature store); the count baselines are the last run's
    run "$STUDY/probe_mean/$task" python -m cehrx task=probe model_dir="$MODEL" probe.task="$task" probe.pooling=mean "probe.baselines=[]" $PROBE_ARGS
  done
fi

if [[ $WHAT == window || $WHAT == all ]]; then
  # Diagnostic: a logistic regression on the bag of tokens of the model's own 512-token window
  # (counts_window) against counts over the whole history: what does the window leave out?
  for task in $TASKS; do
    run "$STUDY/probe_window/$task" python -m cehrx task=probe model_dir="$MODEL" probe.task="$task" probe.pooling=mean \
      $PROBE_ARGS "probe.baselines=[counts_window]" probe.random_init=false "probe.few_shot=[]"  # the last value of a key wins
  done
fi

if [[ $WHAT == zeroshot || $WHAT == all ]]; then
  for task in $TASKS; do
    run "$STUDY/zeroshot/$task" python -m cehrx task=zeroshot model_dir="$MODEL" probe.task="$task" $ZS_ARGS
    run "$STUDY/zeroshot_random_init/$task" python -m cehrx task=zeroshot model_dir="$MODEL" probe.task="$task" zeroshot.random_init=true $ZS_ARGS
  done
fi

if [[ $WHAT == synthetic || $WHAT == all ]]; then
  # 5,000 synthetic patients and the evaluate report (model vs the independent-marginals baseline)
  log "start: generate + evaluate"
  /usr/bin/time -f "  wall %e s, peak RSS %M KB" python -m cehrx experiment=synthea20k output_dir="$ROOT" "pipeline.stages=[generate,evaluate]"
  log "end: generate + evaluate"
fi
}
main "$@"
exit
