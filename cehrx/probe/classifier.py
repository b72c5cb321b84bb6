"""The probe classifier: one recipe for embeddings and baselines alike, so they compare fairly.

`kind="logistic"`: standardised features -> L2 logistic regression, the inverse regularisation
`C` chosen by (subject-grouped, stratified) cross-validated AUROC on the training rows.
`kind="hgb"`: scikit-learn's HistGradientBoostingClassifier with early stopping, for the
count baseline (on the most frequent columns when there are many).
"""

from __future__ import annotations

import logging
import warnings

import numpy as np
import scipy.sparse as sp
from threadpoolctl import threadpool_limits

log = logging.getLogger("cehrx.probe")

CS = np.logspace(-4, 2, 13)
MAX_FOLDS = 5
HGB_MAX_COLUMNS = 1000
DENSE_MAX_CELLS = 50_000_000  # sparse inputs up to this size are densified (centred scaling, 10x faster fits)


def fit_predict(
    X_train,
    y_train: np.ndarray,
    X_test,
    seed: int = 0,
    kind: str = "logistic",
    *,
    groups: np.ndarray | None = None,
    info: dict | None = None,
) -> np.ndarray:
    """Fit on the training rows, return P(y=1) for the test rows.

    `groups` (subject ids of the training rows) keeps a subject's rows in one CV fold. With a
    single class in `y_train` the prediction is that class's rate (nothing to learn). `info`, if
    given, receives what was chosen (C, folds).
    """
    y = np.asarray(y_train).astype(bool)
    info = info if info is not None else {}
    n_test = X_test.shape[0]
    if y.all() or not y.any():
        info.update({"kind": "constant", "reason": "one class in training labels"})
        return np.full(n_test, float(y.mean()) if len(y) else 0.5)
    # One BLAS thread: these fits are many small solves, where threaded BLAS only adds contention
    # (10x slower on a busy machine); HGB keeps its own OpenMP threads.
    if kind == "logistic":
        return _logistic(X_train, y, X_test, seed, groups, info)
    if kind == "hgb":
        return _hgb(X_train, y, X_test, seed, info)
    raise ValueError(f"unknown classifier kind {kind!r} (logistic | hgb)")


def cv_splits(y: np.ndarray, groups: np.ndarray | None, seed: int) -> list[tuple[np.ndarray, np.ndarray]] | None:
    """Stratified (group) K-fold splits with K = min(5, minority count, groups); None if K < 2."""
    from sklearn.model_selection import StratifiedGroupKFold, StratifiedKFold

    n_min = int(min(y.sum(), (~y).sum()))
    if groups is not None:
        n_groups_min = min(len(np.unique(groups[y])), len(np.unique(groups[~y])))
        n_min = min(n_min, n_groups_min)
    k = min(MAX_FOLDS, n_min)
    if k < 2:
        return None
    if groups is not None:
        cv = StratifiedGroupKFold(n_splits=k, shuffle=True, random_state=seed)
        return list(cv.split(np.zeros(len(y)), y, groups))
    return list(StratifiedKFold(n_splits=k, shuffle=True, random_state=seed).split(np.zeros(len(y)), y))


def _logistic(X_train, y, X_test, seed: int, groups, info: dict) -> np.ndarray:
    if sp.issparse(X_train) and X_train.shape[0] * X_train.shape[1] <= DENSE_MAX_CELLS:
        X_train, X_test = X_train.toarray(), X_test.toarray()
    model = fit_logistic(X_train, y, seed, groups, info)
    with threadpool_limits(1, user_api="blas"):
        return model.predict_proba(X_test)[:, 1]


def fit_logistic(X_train, y, seed: int, groups=None, info: dict | None = None):
    """The fitted `StandardScaler -> LogisticRegression(CV)` pipeline (also the fine-tuning head's start)."""
    from sklearn.linear_model import LogisticRegression, LogisticRegressionCV
    from sklearn.pipeline import make_pipeline
    from sklearn.preprocessing import StandardScaler

    info = info if info is not None else {}
    y = np.asarray(y).astype(bool)
    sparse = sp.issparse(X_train)
    scaler = StandardScaler(with_mean=not sparse)
    splits = cv_splits(y, groups, seed)
    if splits is None:
        clf = LogisticRegression(C=1.0, max_iter=5000)
        info.update({"kind": "logistic", "C": 1.0, "folds": 0})
    else:
        clf = LogisticRegressionCV(Cs=CS, cv=splits, scoring="roc_auc", max_iter=5000, n_jobs=1)
    model = make_pipeline(scaler, clf)
    with warnings.catch_warnings(), threadpool_limits(1, user_api="blas"):
        warnings.simplefilter("ignore")  # convergence chatter at the weakest regularisation
        model.fit(X_train, y)
    if splits is not None:
        # The CV AUROC of the chosen C on the training rows: compares count features or pretraining recipes
        # without looking at the test rows. Not pretrained vs random init: the training rows are mostly of
        # patients the model was pretrained on, outcomes included.
        cv_auroc = float(np.max(np.mean(next(iter(clf.scores_.values())), axis=0)))
        info.update({"kind": "logistic", "C": float(np.ravel(clf.C_)[0]), "folds": len(splits), "cv_auroc": cv_auroc})
    return model


def _hgb(X_train, y, X_test, seed: int, info: dict) -> np.ndarray:
    from sklearn.ensemble import HistGradientBoostingClassifier

    cols = None
    if X_train.shape[1] > HGB_MAX_COLUMNS:
        nnz = np.asarray((X_train != 0).sum(0)).ravel()
        cols = np.sort(np.argsort(-nnz, kind="stable")[:HGB_MAX_COLUMNS])
        X_train, X_test = X_train[:, cols], X_test[:, cols]
    dense = lambda X: X.toarray() if sp.issparse(X) else np.asarray(X)
    clf = HistGradientBoostingClassifier(
        learning_rate=0.05,
        max_iter=300,
        max_leaf_nodes=15,
        l2_regularization=1.0,
        early_stopping=len(y) >= 200,
        validation_fraction=0.15,
        random_state=seed,
    )
    clf.fit(dense(X_train), y)
    info.update({"kind": "hgb", "iterations": int(clf.n_iter_), "columns": int(X_train.shape[1])})
    return clf.predict_proba(dense(X_test))[:, 1]
