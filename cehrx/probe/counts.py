"""Count-based baseline features: what a model's embedding has to beat.

For each label, the number of times each code occurs in the subject's MEDS events with
`time <= prediction_time` (static rows with a null time, such as MIMIC's `GENDER//F`, always
count), plus age at the prediction time in years and an "age unknown" flag. Gender and race
enter as their codes. One DuckDB range join over the MEDS shards, no Python loop per event.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa
import scipy.sparse as sp

from cehrx.data import duck
from cehrx.probe.labels import meds_data_files

AGE_COLUMN = "AGE_YEARS"
AGE_UNKNOWN = "AGE_UNKNOWN"
BIRTH_CODE = "MEDS_BIRTH"


def count_features(
    meds_dir: Path, labels: pa.Table, vocabulary: list[str] | None = None, *, memory_limit: str = "3GB"
) -> tuple[sp.csr_matrix, list[str]]:
    """`(X, column_names)`: rows aligned with `labels`; code counts, then age and age-unknown.

    `vocabulary` fixes the code columns (e.g. those seen when fitting); codes outside it are
    ignored. With None, every code seen in any label's history becomes a column (sorted).
    """
    files = [str(f) for f in meds_data_files(meds_dir)]
    con = duck.connect(memory_limit)
    try:
        lab = pa.table(
            {
                "li": pa.array(np.arange(len(labels), dtype=np.int64)),
                "subject_id": labels.column("subject_id").cast(pa.int64()),
                "t": labels.column("prediction_time").cast(pa.timestamp("us")),
            }
        )
        con.register("lab", lab)
        con.execute(
            f"CREATE TEMP VIEW ev AS SELECT subject_id, CAST(time AS TIMESTAMP) AS time, code FROM read_parquet({files!r}, union_by_name=true)"
        )
        counts = con.sql("""
            SELECT l.li, e.code, count(*)::DOUBLE AS n
            FROM lab l JOIN ev e ON e.subject_id = l.subject_id AND (e.time IS NULL OR e.time <= l.t)
            WHERE e.code IS NOT NULL AND e.code <> 'MEDS_BIRTH'
            GROUP BY ALL
        """).to_arrow_table()
        ages = con.sql(f"""
            SELECT l.li, date_diff('day', b.birth, l.t) / 365.25 AS age
            FROM lab l LEFT JOIN (SELECT subject_id, min(time) AS birth FROM ev WHERE code = '{BIRTH_CODE}' GROUP BY 1) b USING (subject_id)
            ORDER BY l.li
        """).to_arrow_table()
    finally:
        con.close()
    codes = counts.column("code").to_numpy(zero_copy_only=False).astype(str) if len(counts) else np.zeros(0, dtype=str)
    if vocabulary is None:
        vocabulary = sorted(set(codes.tolist()))
    col_of = {c: i for i, c in enumerate(vocabulary)}
    cols = np.array([col_of.get(c, -1) for c in np.unique(codes)], dtype=np.int64)
    uniq, inv = np.unique(codes, return_inverse=True)
    col = cols[inv] if len(uniq) else np.zeros(0, dtype=np.int64)
    keep = col >= 0
    rows = counts.column("li").to_numpy()[keep] if len(counts) else np.zeros(0, dtype=np.int64)
    vals = counts.column("n").to_numpy()[keep] if len(counts) else np.zeros(0)
    X_codes = sp.csr_matrix((vals, (rows, col[keep])), shape=(len(labels), len(vocabulary)))
    age = ages.column("age").to_numpy(zero_copy_only=False).astype(np.float64) if len(ages) else np.zeros(0)
    unknown = ~np.isfinite(age)
    X_age = sp.csr_matrix(np.stack([np.where(unknown, 0.0, age), unknown.astype(np.float64)], 1))
    return sp.hstack([X_codes, X_age], format="csr"), [*vocabulary, AGE_COLUMN, AGE_UNKNOWN]


def window_counts(tokens: np.ndarray, offsets: np.ndarray, vocab_size: int) -> sp.csr_matrix:
    """Token counts of each history window the model reads (`Histories.tokens/offsets`): `[n, vocab_size]`.

    The `counts_window` baseline: a linear model on exactly the tokens the transformer sees
    (prompt with age, gender and race; the last `max_len` tokens), where `counts` sees every
    event since birth. Their gap measures what the window leaves out of a lifelong history.
    """
    n = len(offsets) - 1
    rows = np.repeat(np.arange(n, dtype=np.int64), np.diff(offsets))
    X = sp.csr_matrix((np.ones(len(rows)), (rows, np.asarray(tokens, dtype=np.int64))), shape=(n, vocab_size))
    X.sum_duplicates()
    return X


def baseline_features(
    kinds, prepared: Path, kept: pa.Table, hist, vocab_size: int, select: np.ndarray | None, min_labels: int
) -> tuple[dict, dict]:
    """The count baselines' feature matrices by name (`counts`: log1p code counts + age, `counts_hgb`:
    raw counts for gradient boosting, `counts_window`: log1p counts of the model's own window tokens).

    Columns are kept when non-zero in at least `min_labels` of the `select` rows' histories: the
    training rows only, so the test split never chooses a feature. `select=None` keeps every column,
    for a caller that chooses them per fold (`column_selector`).
    """
    from cehrx.probe.labels import meds_dir_for

    features, info = {}, {}
    if {"counts", "counts_hgb"} & set(kinds):
        counts, names = count_features(meds_dir_for(prepared), kept)
        info = {"codes": len(names) - 2}
        if select is not None:
            common = frequent_columns(counts, select, min_labels)
            common[-2:] = True  # age columns
            counts = counts[:, np.flatnonzero(common)]
            info["columns_kept"] = int(common.sum())
        if "counts" in kinds:
            logc = counts.copy()
            logc.data = np.log1p(logc.data)
            features["counts"] = logc
        if "counts_hgb" in kinds:
            features["counts_hgb"] = counts
    if "counts_window" in kinds:
        win = window_counts(hist.tokens, hist.offsets, vocab_size)
        if select is not None:
            win = win[:, np.flatnonzero(frequent_columns(win, select, min_labels))]
        win.data = np.log1p(win.data)
        features["counts_window"] = win
    return features, info


def frequent_columns(X: Any, rows: np.ndarray, min_labels: int) -> np.ndarray:
    """bool per column: non-zero in at least `min_labels` of the given (training) rows' histories."""
    return np.asarray((X[rows] != 0).sum(0)).ravel() >= min_labels


def column_selector(name: str, X: Any, min_labels: int):
    """`rows -> column indices` for baseline `name` on features from `baseline_features(select=None)`:
    the columns non-zero in at least `min_labels` of those (training) rows, plus the age columns of
    `counts` / `counts_hgb`. Cross-fitting calls it per fold, so a fold's test rows never choose a column."""
    always = np.zeros(X.shape[1], dtype=bool)
    if name in ("counts", "counts_hgb"):
        always[-2:] = True  # AGE_COLUMN, AGE_UNKNOWN

    def columns(rows: np.ndarray) -> np.ndarray:
        return np.flatnonzero(frequent_columns(X, rows, min_labels) | always)

    return columns
