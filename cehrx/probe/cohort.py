"""The labelled histories a supervised run scores: one recipe for probe and finetune.

Labels (after `thin_training_labels`) -> each label's history cut at its prediction time
(`cehrx.data.history.cut_histories`) -> the labels that kept a history, with their subject,
outcome and split. Probe and finetune build it the same way, so their numbers are comparable
on the same rows; the count baselines are computed from the same kept labels
(`cehrx.probe.counts.baseline_features`).
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pyarrow as pa

from cehrx.data.hashing import unit_hash
from cehrx.data.history import Histories, cut_histories, load_all_splits, subject_rows
from cehrx.errors import CehrxError
from cehrx.probe import labels as L


@dataclass
class Cohort:
    labels: pa.Table  # the kept labels (thinned, with a history), aligned with every array below
    hist: Histories
    sid: np.ndarray  # int64 subject ids
    y: np.ndarray  # bool outcomes
    split: np.ndarray  # str: train | tuning | held_out (the prepared data's split of each subject)
    n_in: int  # labels before thinning and dropping
    thinned: dict  # what `thin_training_labels` removed

    def __len__(self) -> int:
        return len(self.y)

    def labels_with_split(self) -> pa.Table:
        return self.labels.append_column("split", pa.array(self.split.astype(str)))


def build_cohort(p, prepared: Path, vocab, table: pa.Table, max_len: int, test_split: str) -> Cohort:
    """`p`: the `probe.*` options (`train_label_fraction`); the test split is never thinned."""
    arrays, split_of = load_all_splits(prepared)
    n_in = len(table)
    fraction = p.get("train_label_fraction")
    table, thinned = thin_training_labels(
        table, arrays, split_of, 1.0 if fraction is None else float(fraction), test_split
    )
    hist = cut_histories(
        arrays, vocab, table.column("subject_id").to_numpy(), L.times_seconds(table.column("prediction_time")), max_len
    )
    if not len(hist):
        raise CehrxError(
            f"none of the {len(table)} labels has a history in {prepared} before its prediction time ({hist.dropped})"
        )
    kept = table.take(pa.array(hist.label_index))
    sid = kept.column("subject_id").to_numpy()
    y = kept.column("boolean_value").to_numpy(zero_copy_only=False).astype(bool)
    split = split_of[subject_rows(arrays, sid)]
    return Cohort(kept, hist, sid, y, split, n_in, thinned)


def thin_training_labels(
    table: pa.Table, arrays, split_of: np.ndarray, fraction: float, test_split: str
) -> tuple[pa.Table, dict]:
    """Keep a fixed `fraction` of the labels outside the test split (`probe.train_label_fraction`).

    Why: a task triggered at every routine visit has ~10 labels per subject, so the training side
    can be far larger than a linear probe needs while every label costs a forward pass. The test
    split (held_out, or `split=`) is never thinned. A label is kept when a hash of (subject_id, prediction_time) falls
    below `fraction`: independent of the outcome and of the seed, so every task and run keeps the
    same prediction times (and `probe.cache_dir` embeds them once).
    """
    if not 0.0 < fraction <= 1.0:
        raise CehrxError(f"probe.train_label_fraction must be in (0, 1], got {fraction}")
    info = {"train_label_fraction": fraction, "dropped": 0}
    if fraction >= 1.0 or not len(table):
        return table, info
    sid = table.column("subject_id").to_numpy()
    rows = subject_rows(arrays, sid)
    split = np.where(rows >= 0, split_of[np.maximum(rows, 0)], "")
    keep = (
        (split == test_split)
        | (rows < 0)
        | (unit_hash(sid, L.times_seconds(table.column("prediction_time"))) < fraction)
    )
    info["dropped"] = int((~keep).sum())
    return table.filter(pa.array(keep)), info
