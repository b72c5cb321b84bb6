"""The probe's fit-and-score protocol keeps test rows out of every training decision (issue #23)."""

from __future__ import annotations

import numpy as np
import scipy.sparse as sp

from cehrx.probe.counts import column_selector
from cehrx.probe.evaluate import Protocol, choose_protocol, cross_fit


def test_cross_fitted_count_columns_are_chosen_on_each_folds_training_rows() -> None:
    """A code seen only in one fold's test histories is no column of that fold's fit (it used to be chosen
    on every row, test folds included); the age columns of `counts` are always kept."""
    rng = np.random.default_rng(0)
    n = 60
    y = np.arange(n) % 2 == 0
    groups = np.arange(n)
    X = np.zeros((n, 5))
    X[:, 0] = rng.poisson(2, n) + 1  # a code in every history
    X[30:, 1] = 1  # a code only in rows 30-59
    X[:, 3] = rng.uniform(20, 80, n)  # AGE_YEARS
    X = sp.csr_matrix(X)  # column 2 is never seen, column 4 (AGE_UNKNOWN) is all 0
    folds = Protocol("cv", [(np.arange(30), np.arange(30, 60)), (np.arange(30, 60), np.arange(30))])
    _, infos = cross_fit(X, y, groups, folds, "logistic", 0, columns=column_selector("counts", X, 2))
    assert [i["columns"] for i in infos] == [3, 4]  # fold 1 also has column 1; both keep the two age columns
    window = column_selector("counts_window", X, 2)  # no age columns in the window counts
    assert window(np.arange(30)).tolist() == [0, 3] and window(np.arange(30, 60)).tolist() == [0, 1, 3]


def test_cross_fitting_for_split_tuning_never_touches_held_out() -> None:
    """`split=tuning` (MEDS-DEV) trains on train only; cross-fitted, held_out labels neither train nor score."""
    split = np.array(["train"] * 40 + ["tuning"] * 20 + ["held_out"] * 20)
    y = np.tile([True, False], 40)
    groups = np.arange(80) // 2
    cv = choose_protocol(split, y, groups, "cv", 1, 5, 0, test_split="tuning")
    assert cv.mode == "cv" and len(cv.folds) == 5
    for train, test in cv.folds:
        assert "held_out" not in set(split[train]) | set(split[test])
    assert set(split[cv.test_rows]) == {"train", "tuning"} and len(cv.test_rows) == 60
    held = choose_protocol(split, y, groups, "cv", 1, 5, 0)  # split=held_out: every label is cross-fitted
    assert len(held.test_rows) == 80
