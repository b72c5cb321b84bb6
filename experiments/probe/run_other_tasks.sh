#!/usr/bin/env bash
# Longer-pretrained tiny model on Synthea 1k vs five random-init controls (experiments/probe/RESULTS.md,
# section "Longer pretraining on Synthea 1k"). Run from the repository root; reuses the prepared data of
# `cehrx experiment=synthea1k output_dir=runs/synthea1k_pipeline`. Random-init features depend only on the
# architecture, vocabulary and seed, so the runs without random init are compared with the random-init
# predictions of the runs that have them (BASE_MEAN: an earlier mean-pooling run with five seeds).
#
#   bash experiments/probe/run_other_tasks.sh            # everything (about 90 min on 2 busy CPU cores)
#   bash experiments/probe/run_other_tasks.sh paired     # only the paired differences, from existing outputs
set -euo pipefail
export OMP_NUM_THREADS=${OMP_NUM_THREADS:-1} MKL_NUM_THREADS=${MKL_NUM_THREADS:-1}
P=${P:-runs/synthea1k_pipeline/prepared}
OUT=${OUT:-runs/study_synthea_long}
BASE_MEAN=${BASE_MEAN:-runs/study_synthea/probe_mean/synthea_inpatient_1y}   # mean pooling, random_init_seeds=5
RUN="nice -n 10 cehrx"

if [[ "${1:-all}" != paired ]]; then
  # 1. pretrain with the defaults (early stopping, patience 5 validations: stops at step 1400, best
  #    val/loss at step 900) and without early stopping (all 2400 steps)
  $RUN task=pretrain data=synthea1k model=tiny trainer=cpu data.prepared_dir=$P output_dir=$OUT/model \
    trainer.max_steps=2400 logger=none
  $RUN task=pretrain data=synthea1k model=tiny trainer=cpu data.prepared_dir=$P output_dir=$OUT/model_noes \
    trainer.max_steps=2400 '~callbacks.early_stopping' logger=none
  # model_noes exports its best checkpoint (step 900, the same weights as $OUT/model); export the final
  # step-2400 weights too, by resuming the finished run (no training) with task.export.weights=last
  mkdir -p $OUT/model_last/checkpoints && cp $OUT/model_noes/checkpoints/last.ckpt $OUT/model_last/checkpoints/
  $RUN task=pretrain data=synthea1k model=tiny trainer=cpu data.prepared_dir=$P output_dir=$OUT/model_last \
    trainer.max_steps=2400 '~callbacks.early_stopping' ckpt_path=last task.export.weights=last logger=none
  # 2. probes: the early-stopped model with five random-init seeds, last-token pooling
  for t in synthea_inpatient_1y synthea_readmission_30d; do
    $RUN task=probe model_dir=$OUT/model data.prepared_dir=$P probe.task=$t probe.random_init=true \
      probe.random_init_seeds=5 output_dir=$OUT/probe/$t
  done
  $RUN task=probe model_dir=$OUT/model data.prepared_dir=$P probe.task=synthea_inpatient_1y probe.random_init=false \
    probe.pooling=mean 'probe.baselines=[]' 'probe.few_shot=[]' output_dir=$OUT/probe_mean/synthea_inpatient_1y
  # 3. probes: the step-2400 weights (no random init: the controls above are the same features)
  for t in synthea_inpatient_1y synthea_readmission_30d; do
    $RUN task=probe model_dir=$OUT/model_last data.prepared_dir=$P probe.task=$t probe.random_init=false \
      'probe.few_shot=[]' output_dir=$OUT/probe_last/$t
  done
  $RUN task=probe model_dir=$OUT/model_last data.prepared_dir=$P probe.task=synthea_inpatient_1y probe.random_init=false \
    probe.pooling=mean 'probe.baselines=[]' 'probe.few_shot=[]' output_dir=$OUT/probe_last_mean/synthea_inpatient_1y
fi

# 4. AUROC(probe) - mean AUROC of the five random-init seeds, paired subject bootstrap (same draws for all).
S=runs/study_synthea/probe
python experiments/probe/paired.py \
  "600-step model (runs/study_synthea), last=$S/synthea_inpatient_1y/predictions/probe.parquet:$OUT/probe/synthea_inpatient_1y" \
  "600-step model (runs/study_synthea), mean=$BASE_MEAN/predictions/probe.parquet:$BASE_MEAN" \
  "600-step model (runs/study_synthea), last, readmission=$S/synthea_readmission_30d/predictions/probe.parquet:$OUT/probe/synthea_readmission_30d" \
  "step-900 best (2400-step schedule), last=$OUT/probe/synthea_inpatient_1y/predictions/probe.parquet:$OUT/probe/synthea_inpatient_1y" \
  "step-900 best (2400-step schedule), mean=$OUT/probe_mean/synthea_inpatient_1y/predictions/probe.parquet:$BASE_MEAN" \
  "step-900 best (2400-step schedule), last, readmission=$OUT/probe/synthea_readmission_30d/predictions/probe.parquet:$OUT/probe/synthea_readmission_30d" \
  "step-2400 weights, last=$OUT/probe_last/synthea_inpatient_1y/predictions/probe.parquet:$OUT/probe/synthea_inpatient_1y" \
  "step-2400 weights, mean=$OUT/probe_last_mean/synthea_inpatient_1y/predictions/probe.parquet:$BASE_MEAN" \
  "step-2400 weights, last, readmission=$OUT/probe_last/synthea_readmission_30d/predictions/probe.parquet:$OUT/probe/synthea_readmission_30d"
