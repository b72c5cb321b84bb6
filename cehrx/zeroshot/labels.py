"""Which labels zero-shot predicts: one split's, optionally a seeded (case-control) sample, as arrays."""

from __future__ import annotations

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from cehrx.data.shards import SPLITS
from cehrx.errors import CehrxError
from cehrx.zeroshot.predict import LabelInputs

__all__ = ["LABEL_SAMPLES", "labels_from", "sample_labels", "select_split"]


def select_split(table: pa.Table, subject_ids: np.ndarray, split_of: np.ndarray, split: str) -> pa.Table:
    """Labels of subjects in `split` (`all`: every label)."""
    if split != "all":
        if split not in SPLITS:
            raise CehrxError(f"split={split!r}: choose one of {', '.join(SPLITS)} or all")
        keep = pa.array(np.asarray(subject_ids)[np.asarray(split_of) == split])
        table = table.filter(pc.is_in(table.column("subject_id"), value_set=keep))
    if not len(table):
        raise CehrxError(f"no labels for split {split!r} (subjects of the prepared dir's {split} split)")
    return table


LABEL_SAMPLES = ("uniform", "case_control")


def sample_labels(
    table: pa.Table, max_labels: int | None, how: str, seed: int
) -> tuple[pa.Table, np.ndarray | None, dict]:
    """At most `max_labels` labels (seeded), and each kept label's weight (None: unweighted).

    `uniform` keeps a simple random sample. `case_control` keeps the positive labels (up to half of
    `max_labels`) and fills the rest with negatives: for a rare outcome (0.6 % of the labels) a
    uniform sample of 2,000 holds ~12 positives, this one every positive. Each label then weighs
    1 / its sampling probability (class count / class sample size), and the metrics are computed
    with those weights, so AUROC, AUPRC, Brier and ECE estimate those of all the split's labels.
    """
    if how not in LABEL_SAMPLES:
        raise CehrxError(f"zeroshot.label_sample must be one of {LABEL_SAMPLES}, got {how!r}")
    n = len(table)
    info = {"method": how, "labels_in_split": n}
    if not max_labels or n <= max_labels:
        return table, None, {**info, "kept": n}
    rng = np.random.default_rng(seed)
    if how == "uniform":
        idx = np.sort(rng.choice(n, int(max_labels), replace=False))
        return table.take(pa.array(idx)), None, {**info, "kept": len(idx)}
    y = table.column("boolean_value").to_numpy(zero_copy_only=False).astype(bool)
    pos, neg = np.flatnonzero(y), np.flatnonzero(~y)
    n_pos = min(len(pos), int(max_labels) // 2)
    n_neg = min(len(neg), int(max_labels) - n_pos)
    idx = np.sort(np.concatenate([rng.choice(pos, n_pos, replace=False), rng.choice(neg, n_neg, replace=False)]))
    w_pos, w_neg = len(pos) / max(n_pos, 1), len(neg) / max(n_neg, 1)
    weight = np.where(y[idx], w_pos, w_neg)
    return (
        table.take(pa.array(idx)),
        weight,
        {
            **info,
            "kept": len(idx),
            "positives": f"{n_pos} of {len(pos)}",
            "negatives": f"{n_neg} of {len(neg)}",
            "weight_positive": w_pos,
            "weight_negative": w_neg,
        },
    )


def labels_from(table: pa.Table, weight: np.ndarray | None = None) -> LabelInputs:
    from cehrx.probe.labels import times_seconds

    return LabelInputs(
        subject_id=table.column("subject_id").to_numpy().astype(np.int64),
        prediction_time=times_seconds(table.column("prediction_time")),
        boolean_value=table.column("boolean_value").to_numpy(zero_copy_only=False).astype(bool),
        weight=weight,
    )
