"""Fit-and-score protocol shared by every probe method (embeddings and baselines).

- **split** (default when the held-out split has enough of both classes): fit on the prepared
  data's `train` + `tuning` subjects (regularisation chosen by CV there), score on `held_out`.
- **cv**: when `held_out` is too small to score (the 100-patient MIMIC-IV demo), subject-grouped
  stratified K-fold cross-fitting over the labels of train, tuning and the test split; every label
  is scored by a model that never saw its subject. It scores `train` subjects, whose timelines the
  model was pretrained on: `scored_rows` counts them, and the task reports the test split's rows apart.
  With `split=tuning` the held_out labels take no part (never a classifier's training row).

Count baselines choose their columns per fold, on the fold's training rows (`cross_fit`'s
`columns`), so no test history decides a feature.

Few-shot: train on k labels sampled from the training rows (stratified, at least one of each
class), `repeats` times with different seeds, scored on the same test rows.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import Callable

import numpy as np
import scipy.sparse as sp

from cehrx.probe.classifier import fit_predict

log = logging.getLogger("cehrx.probe")

TRAIN_SPLITS = ("train", "tuning")
TEST_SPLIT = "held_out"
PRETRAIN_SPLIT = "train"  # the split pretraining fits on (CehrxDataModule's train_split)


@dataclass
class Protocol:
    mode: str  # "split" | "cv"
    folds: list[tuple[np.ndarray, np.ndarray]]  # (train rows, test rows)

    @property
    def test_rows(self) -> np.ndarray:
        return np.sort(np.concatenate([t for _, t in self.folds]))


def choose_protocol(
    split: np.ndarray,
    y: np.ndarray,
    groups: np.ndarray,
    mode: str,
    min_test: int,
    n_folds: int,
    seed: int,
    test_split: str = TEST_SPLIT,
) -> Protocol:
    """`split` / `cv` / `auto` (split unless the test split has fewer than `min_test` of either class).

    The test split is held_out by default; `split=tuning` (MEDS-DEV) tests on tuning and
    trains on train only: held_out never trains a classifier.
    """
    if test_split not in (*TRAIN_SPLITS, TEST_SPLIT):
        raise ValueError(f"split must be one of {(*TRAIN_SPLITS, TEST_SPLIT)}, got {test_split!r}")
    train = np.flatnonzero(np.isin(split, [s for s in TRAIN_SPLITS if s != test_split]))
    test = np.flatnonzero(split == test_split)
    yt = y[test]
    enough = len(test) and min(int(yt.sum()), int((~yt).sum())) >= min_test
    if mode == "split" or (mode == "auto" and enough):
        return Protocol("split", [(train, test)])
    if mode not in ("auto", "cv"):
        raise ValueError(f"probe.evaluation must be auto | split | cv, got {mode!r}")
    from sklearn.model_selection import StratifiedGroupKFold

    rows = np.sort(np.concatenate([train, test]))  # split=tuning: held_out never enters, not even cross-fitted
    yr, gr = y[rows], groups[rows]
    k = max(2, min(n_folds, int(yr.sum()), int((~yr).sum()), len(np.unique(gr))))
    cv = StratifiedGroupKFold(n_splits=k, shuffle=True, random_state=seed)
    return Protocol("cv", [(rows[a], rows[b]) for a, b in cv.split(np.zeros(len(rows)), yr, gr)])


def scored_rows(split: np.ndarray, y: np.ndarray, groups: np.ndarray, protocol: Protocol) -> dict[str, int]:
    """Who the reported metrics rest on: labels, subjects, and how many were in pretraining.

    Why: positives cluster in few subjects (22 held-out positives can be 9 patients), which the
    label count hides; and cross-fitting scores `train` subjects, whose whole timelines, outcomes
    included, the model was pretrained on, which favours the pretrained embedding.
    """
    test = protocol.test_rows
    seen = test[split[test] == PRETRAIN_SPLIT]
    return {
        "labels": len(test),
        "positives": int(y[test].sum()),
        "subjects": len(np.unique(groups[test])),
        "positive_subjects": len(np.unique(groups[test][y[test]])),
        "pretraining_labels": len(seen),
        "pretraining_subjects": len(np.unique(groups[seen])),
    }


def cross_fit(
    X,
    y: np.ndarray,
    groups: np.ndarray,
    protocol: Protocol,
    kind: str,
    seed: int,
    columns: Callable[[np.ndarray], np.ndarray] | None = None,
) -> tuple[np.ndarray, list[dict]]:
    """Out-of-sample P(y=1) for every test row (NaN elsewhere) and the classifier info per fold.

    `columns(train_rows)`: the feature columns a fold may use, chosen on its training rows only
    (count baselines: `cehrx.probe.counts.column_selector`); recorded as the fold's `columns`."""
    probs = np.full(len(y), np.nan)
    infos = []
    for train, test in protocol.folds:
        info: dict = {}
        Xf = X
        if columns is not None:
            cols = columns(train)
            Xf = X[:, cols]
            info["columns"] = len(cols)
        probs[test] = fit_predict(
            _rows(Xf, train), y[train], _rows(Xf, test), seed=seed, kind=kind, groups=groups[train], info=info
        )
        infos.append(info)
    return probs, infos


def few_shot(
    X,
    y: np.ndarray,
    groups: np.ndarray,
    protocol: Protocol,
    ks: list,
    repeats: int,
    kind: str,
    seed: int,
    all_probs: np.ndarray | None = None,
) -> list[dict]:
    """AUROC (mean, sd over repeats) when training on k sampled labels; `all` = every training label
    (`all_probs`, the full fit's predictions, are reused when given)."""
    from sklearn.metrics import roc_auc_score

    if protocol.mode != "split":
        return []
    train, test = protocol.folds[0]
    yt = y[test]
    if yt.all() or not yt.any():
        return []
    out = []
    for k in ks:
        if str(k) == "all" or int(k) >= len(train):
            p = (
                all_probs[test]
                if all_probs is not None
                else fit_predict(_rows(X, train), y[train], _rows(X, test), seed=seed, kind=kind, groups=groups[train])
            )
            out = [r for r in out if r["k"] != "all"]
            out.append(
                {"k": "all", "n_train": len(train), "auroc": float(roc_auc_score(yt, p)), "auroc_sd": 0.0, "repeats": 1}
            )
            continue
        scores = []
        for r in range(repeats):
            rows = stratified_sample(y[train], int(k), np.random.default_rng(seed + 1000 * r + int(k)))
            sel = train[rows]
            p = fit_predict(_rows(X, sel), y[sel], _rows(X, test), seed=seed + r, kind=kind, groups=groups[sel])
            scores.append(roc_auc_score(yt, p))
        out.append(
            {
                "k": int(k),
                "n_train": int(k),
                "auroc": float(np.mean(scores)),
                "auroc_sd": float(np.std(scores)),
                "repeats": repeats,
            }
        )
    return out


def stratified_sample(y: np.ndarray, k: int, rng: np.random.Generator) -> np.ndarray:
    """k row indices keeping the class balance, with at least one row of each class when possible."""
    pos, neg = np.flatnonzero(y), np.flatnonzero(~y)
    n_pos = int(round(k * len(pos) / max(len(y), 1)))
    n_pos = min(max(n_pos, 1 if len(pos) else 0), len(pos), k - (1 if len(neg) else 0))
    n_neg = min(k - n_pos, len(neg))
    return np.sort(np.concatenate([rng.choice(pos, n_pos, replace=False), rng.choice(neg, n_neg, replace=False)]))


def _rows(X, idx: np.ndarray):
    return X[idx] if sp.issparse(X) else np.asarray(X)[idx]
