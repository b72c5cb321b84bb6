#!/usr/bin/env bash
# Linear probe on the shipped Eunomia GiBleed tasks: a pretrained tiny model vs the same
# architecture with random weights (probe.random_init=true) vs count baselines.
# Reruns the numbers in RESULTS.md.
#   bash experiments/probe/run.sh [root]        (default root: runs/probe_gibleed)
#   STEPS=600 bash experiments/probe/run.sh     (the pretrain default; RESULTS.md used 150, see there)
#   SEEDS=5: random-init controls per task (one random model is a noisy bar)
set -euo pipefail
ROOT=${1:-runs/probe_gibleed}
STEPS=${STEPS:-150}
SEEDS=${SEEDS:-5}   # random-init controls (seeds 42..46)
[ -f "$ROOT/prepared/prepare.json" ] || cehrx task=prepare data=gibleed output_dir=$ROOT/prepared
[ -f "$ROOT/model/model/config.json" ] || cehrx task=pretrain model=tiny trainer=cpu data=gibleed \
  data.prepared_dir=$ROOT/prepared output_dir=$ROOT/model trainer.max_steps=$STEPS task.module.warmup_steps=30 \
  trainer.val_check_interval=50 callbacks.last.every_n_train_steps=50
for task in gibleed_after_nsaid gibleed_after_osteoarthritis; do
  cehrx task=probe model_dir=$ROOT/model data.prepared_dir=$ROOT/prepared probe.task=$task \
    probe.random_init=true probe.random_init_seeds=$SEEDS output_dir=$ROOT/probe/$task overwrite=true
done
for task in gibleed_after_nsaid gibleed_after_osteoarthritis; do   # mean pooling (embeddings only)
  cehrx task=probe model_dir=$ROOT/model data.prepared_dir=$ROOT/prepared probe.task=$task \
    probe.random_init=true probe.random_init_seeds=$SEEDS probe.pooling=mean probe.baselines=[] output_dir=$ROOT/probe_mean/$task overwrite=true
done
python experiments/probe/summarize.py $ROOT/probe
python experiments/probe/summarize.py $ROOT/probe_mean
