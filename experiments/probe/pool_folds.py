"""Pool the held-out predictions of cross-fitted probe runs (one per fold) into one probe-like dir.

Each fold's probe dir scored its own held-out subjects; the folds are disjoint, so concatenating
them gives every subject once (a fold whose labels are all of one class has no AUROC of its own,
"n/a", but its predictions count in the pooled one). Writes `OUT/predictions/<method>.parquet`
(what `paired.py` reads) and prints per-fold and pooled AUROC with a subject-bootstrap 95 % CI per
method. Reads the files with `paired.py`'s reader (the script beside this one).

    python experiments/probe/pool_folds.py OUT FOLD0_PROBE_DIR FOLD1_PROBE_DIR ...
"""

from __future__ import annotations

import sys
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
from paired import SEEDS, arrays
from sklearn.metrics import roc_auc_score

from cehrx.eval.metrics import bootstrap

METHODS = ["probe", *SEEDS, "counts", "counts_hgb"]


def main(out: Path, folds: list[Path]) -> None:
    (out / "predictions").mkdir(parents=True, exist_ok=True)
    print("| method | " + " | ".join(f"fold {i}" for i in range(len(folds))) + " | pooled [95 % CI] |")
    print("|---|" + "---:|" * (len(folds) + 1))
    counts = "no probe predictions"
    for m in METHODS:
        paths = [f / "predictions" / f"{m}.parquet" for f in folds]
        if not all(p.is_file() for p in paths):
            continue
        tables = [pq.read_table(p) for p in paths]
        pooled = pa.concat_tables(tables)
        pq.write_table(pooled, out / "predictions" / f"{m}.parquet")
        y, sid, p = arrays(pooled)
        parts = [arrays(t) for t in tables]
        assert len(np.unique(sid)) == sum(len(np.unique(s)) for _, s, _ in parts), "folds share subjects"
        lo, hi = np.nanpercentile(bootstrap(y, p, sid, 1000, 0)["auroc"], [2.5, 97.5])
        each = " | ".join(f"{roc_auc_score(yf, pf):.3f}" if 0 < yf.sum() < len(yf) else "n/a" for yf, _, pf in parts)
        print(f"| {m} | {each} | {roc_auc_score(y, p):.3f} [{lo:.3f}, {hi:.3f}] |")
        if m == "probe":
            counts = f"{len(y)} labels, {int(y.sum())} positive, {len(np.unique(sid))} subjects, {len(np.unique(sid[y]))} with a positive"
    print(f"\npooled: {counts}")


if __name__ == "__main__":
    main(Path(sys.argv[1]), [Path(p) for p in sys.argv[2:]])
