"""AUROC(probe) minus the mean AUROC of the five random-init seeds, with a paired subject bootstrap.

Every prediction set is scored on the same 1,000 subject-bootstrap draws (seed 0), so the CI is of
the difference itself, not two overlapping intervals. A control dir is a probe output dir run with
`probe.random_init=true probe.random_init_seeds=5` (its `predictions/random_init*.parquet`).

    python experiments/probe/paired.py "label=PROBE_PREDICTIONS.parquet:CONTROL_DIR" ...
"""

from __future__ import annotations

import sys
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq
from sklearn.metrics import roc_auc_score

from cehrx.eval.metrics import bootstrap

SEEDS = ["random_init"] + [f"random_init_{k}" for k in range(2, 6)]


def load(path: Path) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    t = pq.read_table(path).sort_by([("subject_id", "ascending"), ("prediction_time", "ascending")])
    return (t.column("boolean_value").to_numpy(zero_copy_only=False).astype(bool), t.column("subject_id").to_numpy(),
            t.column("predicted_boolean_probability").to_numpy().astype(float))


def paired(probe_path: Path, control_dir: Path, n_boot: int = 1000) -> tuple[float, float, float, int]:
    """(difference, CI low, CI high, seeds the probe beats)."""
    y, sid, p = load(probe_path)
    auc = roc_auc_score(y, p)
    boot_p = bootstrap(y, p, sid, n_boot, 0)["auroc"]
    ctrl, boot_c = [], []
    for s in SEEDS:
        yc, sc, pc = load(control_dir / "predictions" / f"{s}.parquet")
        assert (yc == y).all() and (sc == sid).all(), "probe and control rows differ"
        ctrl.append(roc_auc_score(y, pc))
        boot_c.append(bootstrap(y, pc, sid, n_boot, 0)["auroc"])
    d = boot_p - np.mean(boot_c, 0)
    d = d[np.isfinite(d)]
    return auc - np.mean(ctrl), np.percentile(d, 2.5), np.percentile(d, 97.5), int(sum(auc > c for c in ctrl))


def parse_spec(spec: str) -> tuple[str, Path, Path]:
    """`label=PROBE:CONTROL_DIR` -> (label, probe path, control dir)."""
    label, paths = spec.split("=", 1)
    probe, ctrl = paths.split(":")
    return label, Path(probe), Path(ctrl)


def main(specs: list[str]) -> None:
    print("| model, pooling | probe - mean of 5 random-init seeds [95% CI, paired subject bootstrap] | seeds beaten |")
    print("|---|---:|---:|")
    for spec in specs:
        name, probe, ctrl = parse_spec(spec)
        if probe.is_file() and (ctrl / "predictions/random_init_5.parquet").is_file():
            d, lo, hi, beaten = paired(probe, ctrl)
            print(f"| {name} | {d:+.3f} [{lo:+.3f}, {hi:+.3f}] | {beaten} of 5 |")
        else:
            print(f"| {name} | (not run) | |")


if __name__ == "__main__":
    main(sys.argv[1:])
