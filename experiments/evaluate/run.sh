#!/usr/bin/env bash
# Reproduces experiments/evaluate/RESULTS.md on CPU: `bash experiments/evaluate/run.sh` (ROOT=runs by default).
# 1. the memorising upper bound (a copy of the train split) next to the independent-marginals baseline;
# 2. a tiny model's samples next to the baseline (the pretrain/generate budget is set for a busy 2-core box:
#    raise trainer.max_steps and generate.num_patients when there is time or a GPU).
set -euo pipefail
ROOT=${ROOT:-runs}
STEPS=${STEPS:-120}
N_GEN=${N_GEN:-300}
for DATA in eunomia synthea1k; do
  P=$ROOT/$DATA
  [ -f $P/prepare.json ] || python -m cehrx task=prepare data=$DATA output_dir=$P
  python experiments/evaluate/copy_as_synthetic.py $P $P/train_copy
  python -m cehrx task=evaluate data.prepared_dir=$P synthetic_dir=$P/train_copy evaluate.baseline=marginal \
      output_dir=$P/report_copy overwrite=true
done
P=$ROOT/eunomia
[ -f $P/model/model/config.json ] || python -m cehrx task=pretrain data.prepared_dir=$P model=tiny trainer=cpu \
    output_dir=$P/model trainer.max_steps=$STEPS trainer.val_check_interval=60 task.module.warmup_steps=20 \
    task.datamodule.max_tokens_per_batch=2048
python -m cehrx task=generate data.prepared_dir=$P model_dir=$P/model output_dir=$P/synthetic \
    generate.num_patients=$N_GEN generate.shard_size=100 sampling.batch_size=100 overwrite=true
python -m cehrx task=evaluate data.prepared_dir=$P synthetic_dir=$P/synthetic evaluate.baseline=marginal \
    output_dir=$P/report_model overwrite=true
python experiments/evaluate/summarize.py $ROOT/eunomia/report_copy $ROOT/eunomia/report_model $ROOT/synthea1k/report_copy
