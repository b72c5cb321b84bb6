#!/usr/bin/env bash
# Zero-shot AUROC on the shipped GiBleed tasks: a pretrained tiny model vs the same architecture
# with random weights (zeroshot.random_init=true). Reruns the GiBleed numbers in RESULTS.md, which are
# Monte Carlo counts (zeroshot.estimator=mc; the default is now auto = hazard): override with ESTIMATOR=auto.
#   bash experiments/zeroshot/run.sh [root]        (default root: runs/zeroshot_gibleed)
# A root already holding prepared/ and model/ (e.g. experiments/probe/run.sh's) is reused.
set -euo pipefail
ROOT=${1:-runs/zeroshot_gibleed}
SAMPLES=${SAMPLES:-20}
ESTIMATOR=${ESTIMATOR:-mc}
[ -f "$ROOT/prepared/prepare.json" ] || cehrx task=prepare data=gibleed output_dir=$ROOT/prepared
[ -f "$ROOT/model/model/config.json" ] || cehrx task=pretrain model=tiny trainer=cpu data=gibleed data.prepared_dir=$ROOT/prepared output_dir=$ROOT/model
for task in gibleed_after_nsaid gibleed_after_osteoarthritis; do
  for init in false true; do
    name=$task$([ "$init" = true ] && echo _random || true)
    cehrx task=zeroshot model_dir=$ROOT/model probe.task=$task split=held_out \
      zeroshot.num_samples=$SAMPLES zeroshot.estimator=$ESTIMATOR zeroshot.random_init=$init output_dir=$ROOT/zeroshot/$name
  done
done
python experiments/zeroshot/summarize.py $ROOT/zeroshot
