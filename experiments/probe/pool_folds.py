"""Pool the held-out predictions of cross-fitted probe runs (one per fold) into one probe-like dir.

Each fold's probe dir scored its own held-out subjects; the folds are disjoint, so concatenating
them gives every subject once. Writes `OUT/predictions/<method>.parquet` (what `paired.py` reads)
and prints per-fold and pooled AUROC with a subject-bootstrap 95 % CI per method.

    python experiments/probe/pool_folds.py OUT FOLD0_PROBE_DIR FOLD1_PROBE_DIR ...
"""

from __future__ import annotations

import sys
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
from sklearn.metrics import roc_auc_score

from cehrx.eval.metrics import bootstrap

METHODS = ["probe", "random_init", "random_init_2", "random_init_3", "random_init_4", "random_init_5", "counts", "counts_hgb"]


def auroc(t: pa.Table) -> float:
    return float(roc_auc_score(t.column("boolean_value").to_numpy(zero_copy_only=False), t.column("predicted_boolean_probability").to_numpy()))


def main(out: Path, folds: list[Path]) -> None:
    (out / "predictions").mkdir(parents=True, exist_ok=True)
    print("| method | " + " | ".join(f"fold {i}" for i in range(len(folds))) + " | pooled [95 % CI] |")
    print("|---|" + "---:|" * (len(folds) + 1))
    for m in METHODS:
        parts = [pq.read_table(f / "predictions" / f"{m}.parquet") for f in folds if (f / "predictions" / f"{m}.parquet").is_file()]
        if len(parts) < len(folds):
            continue
        t = pa.concat_tables(parts)
        sids = t.column("subject_id").to_numpy()
        assert len(np.unique(np.concatenate([p.column("subject_id").unique().to_numpy() for p in parts]))) == sum(
            len(p.column("subject_id").unique()) for p in parts), "folds share subjects"
        pq.write_table(t, out / "predictions" / f"{m}.parquet")
        y = t.column("boolean_value").to_numpy(zero_copy_only=False).astype(bool)
        boot = bootstrap(y, t.column("predicted_boolean_probability").to_numpy().astype(float), sids, 1000, 0)["auroc"]
        lo, hi = np.nanpercentile(boot, [2.5, 97.5])
        print(f"| {m} | " + " | ".join(f"{auroc(p):.3f}" for p in parts) + f" | {auroc(t):.3f} [{lo:.3f}, {hi:.3f}] |")
    t = pq.read_table(out / "predictions" / "probe.parquet")
    y, sid = t.column("boolean_value").to_numpy(zero_copy_only=False), t.column("subject_id").to_numpy()
    print(f"\npooled: {len(y)} labels, {int(y.sum())} positive, {len(np.unique(sid))} subjects, "
          f"{len(np.unique(sid[y]))} with a positive")


if __name__ == "__main__":
    main(Path(sys.argv[1]), [Path(p) for p in sys.argv[2:]])
