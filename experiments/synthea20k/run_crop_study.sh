#!/usr/bin/env bash
# Crop sampling, a controlled test (experiments/synthea20k/RESULTS.md, "Crop sampling"): the Synthea 20k model
# (4,000 steps, crop_sampling=visits) continued for 600 more steps with each crop sampling, the same schedule
# and seed; then zero-shot (death, inpatient; hazard and Monte Carlo) and 500 generated patients per model,
# the unchanged model beside them. A third arm, tokens_after_death, also drops the [END] target after an
# alive record's last token (task.datamodule.end_token=after_death). Then: python experiments/synthea20k/crop_study.py
#   bash experiments/synthea20k/run_crop_study.sh          # ~80 min on 2 cores; rerun to resume
set -euo pipefail
main() {
cd "$(dirname "$0")/../.."
ROOT=${ROOT:-runs/synthea20k}
OUT=${OUT:-runs/cropstudy}
log() { echo "[$(date -u +%FT%TZ) load $(cut -d' ' -f1-3 /proc/loadavg)] $*"; }
ARMS="tokens visits tokens_after_death"
for arm in $ARMS; do
  out=$OUT/$arm
  case $arm in
    tokens_after_death) extra="task.datamodule.crop_sampling=tokens task.datamodule.end_token=after_death" ;;
    *) extra="task.datamodule.crop_sampling=$arm task.datamodule.end_token=always" ;;
  esac
  [[ -f $out/metrics.json ]] && continue
  mkdir -p "$out"
  [[ -d $out/checkpoints ]] || cp -r "$ROOT/model/checkpoints" "$out/"
  log "start pretrain $arm"
  /usr/bin/time -f "  wall %e s, peak RSS %M KB" python -m cehrx task=pretrain data=synthea20k model=tiny trainer=cpu \
    model.max_seq_len=1024 task.datamodule.max_tokens_per_batch=8192 trainer.max_steps=4600 task.module.warmup_steps=200 \
    trainer.val_check_interval=300 trainer.limit_val_batches=40 $extra task.export.weights=last \
    output_dir="$out" ckpt_path=last
done
ZS="zeroshot.num_samples=10 sampling.max_new_tokens=512 zeroshot.history_len=512 zeroshot.max_labels=400 \
zeroshot.label_sample=case_control zeroshot.progress=false probe.labels_cache_dir=$ROOT/labels_cache"
set -f
for arm in $ARMS base; do
  model=$OUT/$arm/model; [[ $arm == base ]] && model=$ROOT/model
  for task in synthea20k_death_1y synthea20k_inpatient_1y; do
    out=$OUT/zs/$arm/$task
    [[ -f $out/metrics.json ]] && continue
    log "start zeroshot $arm $task"
    /usr/bin/time -f "  wall %e s, peak RSS %M KB" python -m cehrx task=zeroshot data=synthea20k model_dir="$model" probe.task=$task $ZS output_dir="$out"
  done
done
for arm in $ARMS base; do
  model=$OUT/$arm/model; [[ $arm == base ]] && model=$ROOT/model
  out=$OUT/gen/$arm
  [[ -f $out/generate.json ]] && continue
  log "start generate $arm"
  /usr/bin/time -f "  wall %e s, peak RSS %M KB" python -m cehrx task=generate data=synthea20k model_dir="$model" \
    generate.num_patients=500 generate.shard_size=500 generate.max_total_tokens=12288 sampling.batch_size=256 \
    generate.progress=false output_dir="$out"
done
log "all done"
}
main "$@"
exit
