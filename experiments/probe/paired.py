"""AUROC(probe) minus the mean AUROC of the five random-init seeds, with a paired subject bootstrap.

Every prediction set is scored on the same 1,000 subject-bootstrap draws (seed 0), so the CI is of
the difference itself, not two overlapping intervals. A control dir is a probe output dir run with
`probe.random_init=true probe.random_init_seeds=5` (its `predictions/random_init*.parquet`).

    python experiments/probe/paired.py "label=PROBE_PREDICTIONS.parquet:CONTROL_DIR" ...

Several probe files, comma-separated (`label=P1,P2,P3:CONTROL_DIR`, e.g. models pretrained with
different seeds), get a row each and a row for their mean AUROC minus the controls' mean, on the same
draws: the spread between pretraining runs is part of what the comparison has to beat.
"""

from __future__ import annotations

import sys
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
from sklearn.metrics import roc_auc_score

from cehrx.eval.metrics import bootstrap

SEEDS = ["random_init"] + [f"random_init_{k}" for k in range(2, 6)]


def load(path: Path) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    return arrays(pq.read_table(path))


def arrays(t: pa.Table) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(labels, subjects, probabilities) of a prediction table, in (subject, time) order."""
    t = t.sort_by([("subject_id", "ascending"), ("prediction_time", "ascending")])
    return (
        t.column("boolean_value").to_numpy(zero_copy_only=False).astype(bool),
        t.column("subject_id").to_numpy(),
        t.column("predicted_boolean_probability").to_numpy().astype(float),
    )


def auroc_boot(path: Path, n_boot: int) -> tuple[np.ndarray, np.ndarray, float, np.ndarray]:
    """(labels, subjects, AUROC, AUROC on each subject-bootstrap draw of seed 0)."""
    y, sid, p = load(path)
    return y, sid, roc_auc_score(y, p), bootstrap(y, p, sid, n_boot, 0)["auroc"]


def paired(probe_paths: list[Path], control_dir: Path, n_boot: int = 1000) -> list[tuple[float, float, float, int]]:
    """Per probe file, then (if several) for their mean: (difference, CI low, CI high, seeds beaten)."""
    runs = [auroc_boot(p, n_boot) for p in probe_paths]
    controls = [auroc_boot(control_dir / "predictions" / f"{s}.parquet", n_boot) for s in SEEDS]
    y, sid = runs[0][:2]
    for path, (yc, sc, _, _) in zip(probe_paths[1:] + [control_dir] * len(SEEDS), runs[1:] + controls):
        assert (yc == y).all() and (sc == sid).all(), f"{path}: rows differ from {probe_paths[0]}"
    ctrl = [auc for _, _, auc, _ in controls]
    boot_c = np.mean([boot for _, _, _, boot in controls], 0)
    rows = [(auc, boot) for _, _, auc, boot in runs]
    if len(rows) > 1:
        rows.append((float(np.mean([a for a, _ in rows])), np.mean([b for _, b in rows], 0)))
    out = []
    for auc, boot in rows:
        d = boot - boot_c
        d = d[np.isfinite(d)]
        out.append(
            (auc - np.mean(ctrl), np.percentile(d, 2.5), np.percentile(d, 97.5), int(sum(auc > c for c in ctrl)))
        )
    return out


def parse_spec(spec: str) -> tuple[str, list[Path], Path]:
    """`label=PROBE[,PROBE...]:CONTROL_DIR` -> (label, probe paths, control dir).

    >>> parse_spec("oa=a/p.parquet,b/p.parquet:ctrl")
    ('oa', [PosixPath('a/p.parquet'), PosixPath('b/p.parquet')], PosixPath('ctrl'))
    """
    label, paths = spec.split("=", 1)
    probes, ctrl = paths.split(":")
    return label, [Path(p) for p in probes.split(",")], Path(ctrl)


def main(specs: list[str]) -> None:
    print("| model, pooling | probe - mean of 5 random-init seeds [95% CI, paired subject bootstrap] | seeds beaten |")
    print("|---|---:|---:|")
    for spec in specs:
        name, probes, ctrl = parse_spec(spec)
        if all(p.is_file() for p in probes) and (ctrl / "predictions/random_init_5.parquet").is_file():
            names = (
                [name] if len(probes) == 1 else [f"{name}, {p.parent.parent}" for p in probes]
            )  # the probe output dirs
            for row, (d, lo, hi, beaten) in zip(names + [f"{name}, mean of {len(probes)}"], paired(probes, ctrl)):
                print(f"| {row} | {d:+.3f} [{lo:+.3f}, {hi:+.3f}] | {beaten} of 5 |")
        else:
            print(f"| {name} | (not run) | |")


if __name__ == "__main__":
    main(sys.argv[1:])
