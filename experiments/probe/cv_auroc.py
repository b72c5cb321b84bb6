"""Training-label CV AUROC: the probe vs five random-init controls, without the held-out rows.

The probe's logistic regression chooses C by subject-grouped 5-fold CV on train + tuning; the
fold-mean AUROC at that C (`cv_auroc`, also in new runs' `metrics.json`) scores a representation on
the training labels, which outnumber the held-out ones. Recomputed here from the saved features so
that runs made before `cv_auroc` was recorded compare too. A control dir is a probe output dir run with
`probe.random_init=true probe.random_init_seeds=5` (its `features_random_init*.parquet`).

    python experiments/probe/cv_auroc.py "label=PROBE_DIR[,PROBE_DIR...]:CONTROL_DIR" ...
"""

from __future__ import annotations

import sys
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq
from paired import SEEDS, parse_spec  # experiments/probe/paired.py, beside this script

from cehrx.probe.classifier import fit_predict

SEED = 42  # the probe's default seed: the same CV folds as the probe runs


def cv_auroc(path: Path) -> float:
    t = pq.read_table(path)
    train = np.isin(np.asarray(t.column("split").to_pylist()), ["train", "tuning"])
    X = np.asarray(t.column("embedding").combine_chunks().flatten()).reshape(len(t), -1)[train]
    y = t.column("boolean_value").to_numpy(zero_copy_only=False).astype(bool)[train]
    info: dict = {}
    fit_predict(X, y, X[:1], seed=SEED, groups=t.column("subject_id").to_numpy()[train], info=info)
    return float(info["cv_auroc"])


def main(specs: list[str]) -> None:
    print("| run | probe CV AUROC | random init: mean ± sd over 5 seeds (each) | probe - mean | seeds beaten |")
    print("|---|---:|---|---:|---:|")
    for spec in specs:
        label, probe_dirs, control_dir = parse_spec(spec)
        ctrl = np.array([cv_auroc(control_dir / f"features_{s}.parquet") for s in SEEDS])
        each = ", ".join(f"{c:.3f}" for c in ctrl)
        for probe_dir in probe_dirs:
            p = cv_auroc(probe_dir / "features.parquet")
            name = label if len(probe_dirs) == 1 else f"{label}, {probe_dir}"
            print(
                f"| {name} | {p:.3f} | {ctrl.mean():.3f} ± {ctrl.std(ddof=1):.3f} ({each}) | {p - ctrl.mean():+.3f} | {int((p > ctrl).sum())} of 5 |"
            )


if __name__ == "__main__":
    main(sys.argv[1:])
