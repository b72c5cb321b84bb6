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
OUT=$OUT BASE_MEAN=$BASE_MEAN python - <<'EOF'
import os
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq
from sklearn.metrics import roc_auc_score

from cehrx.eval.metrics import bootstrap

out, base_mean = Path(os.environ["OUT"]), Path(os.environ["BASE_MEAN"])
SEEDS = ["random_init"] + [f"random_init_{k}" for k in range(2, 6)]


def load(path):
    t = pq.read_table(path).sort_by([("subject_id", "ascending"), ("prediction_time", "ascending")])
    return (t.column("boolean_value").to_numpy(zero_copy_only=False).astype(bool), t.column("subject_id").to_numpy(),
            t.column("predicted_boolean_probability").to_numpy().astype(float))


def paired(probe_path, control_dir, n_boot=1000):
    y, sid, p = load(probe_path)
    boot_p = bootstrap(y, p, sid, n_boot, 0)["auroc"]
    ctrl, boot_c = [], []
    for s in SEEDS:
        yc, sc, pc = load(control_dir / "predictions" / f"{s}.parquet")
        assert (yc == y).all() and (sc == sid).all(), "probe and control rows differ"
        ctrl.append(roc_auc_score(y, pc))
        boot_c.append(bootstrap(y, pc, sid, n_boot, 0)["auroc"])
    d = boot_p - np.mean(boot_c, 0)
    d = d[np.isfinite(d)]
    return roc_auc_score(y, p) - np.mean(ctrl), np.percentile(d, 2.5), np.percentile(d, 97.5)


rows = [
    ("600-step model (runs/study_synthea), last", Path("runs/study_synthea/probe/synthea_inpatient_1y/predictions/probe.parquet"), out / "probe/synthea_inpatient_1y"),
    ("600-step model (runs/study_synthea), mean", base_mean / "predictions/probe.parquet", base_mean),
    ("600-step model (runs/study_synthea), last, readmission", Path("runs/study_synthea/probe/synthea_readmission_30d/predictions/probe.parquet"), out / "probe/synthea_readmission_30d"),
    ("step-900 best (2400-step schedule), last", out / "probe/synthea_inpatient_1y/predictions/probe.parquet", out / "probe/synthea_inpatient_1y"),
    ("step-900 best (2400-step schedule), mean", out / "probe_mean/synthea_inpatient_1y/predictions/probe.parquet", base_mean),
    ("step-900 best (2400-step schedule), last, readmission", out / "probe/synthea_readmission_30d/predictions/probe.parquet", out / "probe/synthea_readmission_30d"),
    ("step-2400 weights, last", out / "probe_last/synthea_inpatient_1y/predictions/probe.parquet", out / "probe/synthea_inpatient_1y"),
    ("step-2400 weights, mean", out / "probe_last_mean/synthea_inpatient_1y/predictions/probe.parquet", base_mean),
    ("step-2400 weights, last, readmission", out / "probe_last/synthea_readmission_30d/predictions/probe.parquet", out / "probe/synthea_readmission_30d"),
]
print("| model, pooling | probe - mean of 5 random-init seeds [95% CI, paired subject bootstrap] |")
print("|---|---:|")
for name, probe, ctrl in rows:
    if probe.is_file() and (ctrl / "predictions/random_init_5.parquet").is_file():
        d, lo, hi = paired(probe, ctrl)
        print(f"| {name} | {d:+.3f} [{lo:+.3f}, {hi:+.3f}] |")
    else:
        print(f"| {name} | (not run) |")
EOF
