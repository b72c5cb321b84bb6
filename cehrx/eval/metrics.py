"""Binary classification metrics with subject-level bootstrap confidence intervals.

Shared by probe and zero-shot, so every cehrx report states the same numbers the same way:
AUROC, AUPRC (average precision, sklearn's step definition), Brier score and expected
calibration error (10 equal-width bins), each as `{"value", "ci_low", "ci_high"}`.

Why subject-level: a subject can contribute several labels (several prediction times), and
those rows are correlated, so resampling rows would understate the uncertainty. Each bootstrap
replicate draws subjects with replacement and keeps all their rows, which is the same as
weighting each row by how many times its subject was drawn. The replicates are computed as
weighted metrics in a few matrix operations (no Python loop per replicate), with ties in the
scores grouped exactly as sklearn groups them.
"""

from __future__ import annotations

import math

import numpy as np

METRICS = ("auroc", "auprc", "brier", "ece")
ECE_BINS = 10
_CHUNK_CELLS = 20_000_000  # bootstrap replicates are processed in chunks of ~this many matrix cells


def binary_metrics(
    y_true: np.ndarray,
    y_prob: np.ndarray,
    subject_ids: np.ndarray,
    n_boot: int = 1000,
    seed: int = 0,
    sample_weight: np.ndarray | None = None,
) -> dict:
    """Point estimates and percentile 95 % CIs (subject-level bootstrap) of AUROC, AUPRC, Brier, ECE.

    AUROC/AUPRC are NaN when `y_true` has a single class; bootstrap replicates with a single class
    are skipped for those two (their count is in `n_boot_valid`). `sample_weight` (e.g. inverse
    sampling probabilities of a case-control sample) weights every row in the point estimates and
    in each bootstrap replicate, so the metrics estimate those of the population sampled from.
    """
    y = np.asarray(y_true).astype(bool)
    p = np.asarray(y_prob, dtype=np.float64)
    if y.shape != p.shape or y.ndim != 1:
        raise ValueError(f"y_true and y_prob must be 1-D of equal length, got {y.shape} and {p.shape}")
    if len(y) and not np.isfinite(p).all():
        raise ValueError("y_prob has NaN or infinite values")
    sw = None if sample_weight is None else np.asarray(sample_weight, dtype=np.float64)
    if sw is not None and (sw.shape != y.shape or not (np.isfinite(sw) & (sw > 0)).all()):
        raise ValueError("sample_weight must be positive and finite, one per row")
    point = _point(y, p) if sw is None else _weighted_point(y, p, sw)
    boots = (
        bootstrap(y, p, np.asarray(subject_ids), n_boot, seed, sw)
        if n_boot > 0 and len(y)
        else {m: np.full(0, np.nan) for m in METRICS}
    )
    out: dict = {}
    for m in METRICS:
        b = boots[m][np.isfinite(boots[m])]
        lo, hi = (float(np.percentile(b, 2.5)), float(np.percentile(b, 97.5))) if len(b) else (math.nan, math.nan)
        out[m] = {"value": point[m], "ci_low": lo, "ci_high": hi}
    out["n"] = len(y)
    out["n_pos"] = int(y.sum())
    out["n_subjects"] = len(np.unique(subject_ids)) if len(y) else 0
    out["n_boot"] = int(n_boot)
    out["n_boot_valid"] = int(np.isfinite(boots["auroc"]).sum())
    if sw is not None:
        out["weighted"] = True
    return out


def paired_difference(
    y_true: np.ndarray,
    subject_ids: np.ndarray,
    p_a: np.ndarray,
    p_controls: list[np.ndarray],
    n_boot: int = 1000,
    seed: int = 0,
    metrics: tuple[str, ...] = ("auroc", "auprc"),
    sample_weight: np.ndarray | None = None,
) -> dict:
    """`metric(a) - mean(metric(control) for control in p_controls)` with a paired 95 % CI.

    Every score set is evaluated on the same subject-bootstrap draws (same `seed`, same rows), so
    the interval is of the difference itself: two methods whose own CIs overlap can still differ
    clearly. With several controls (random-init seeds) their mean is the bar. `beats` counts the
    controls `a` is above. `sample_weight` as in `binary_metrics`.
    """
    y = np.asarray(y_true).astype(bool)
    sid = np.asarray(subject_ids)
    sw = None if sample_weight is None else np.asarray(sample_weight, np.float64)
    pa_, pcs = np.asarray(p_a, np.float64), [np.asarray(c, np.float64) for c in p_controls]
    point = (lambda q: _point(y, q)) if sw is None else (lambda q: _weighted_point(y, q, sw))
    point_a, points_c = point(pa_), [point(c) for c in pcs]
    boot_a = bootstrap(y, pa_, sid, n_boot, seed, sw)
    boots_c = [bootstrap(y, c, sid, n_boot, seed, sw) for c in pcs]
    out: dict = {"n_controls": len(pcs), "n_boot": int(n_boot)}
    for m in metrics:
        d = boot_a[m] - np.mean([b[m] for b in boots_c], 0)
        d = d[np.isfinite(d)]
        lo, hi = (float(np.percentile(d, 2.5)), float(np.percentile(d, 97.5))) if len(d) else (math.nan, math.nan)
        ctrl = [c[m] for c in points_c]
        out[m] = {
            "value": point_a[m] - float(np.mean(ctrl)),
            "ci_low": lo,
            "ci_high": hi,
            "beats": int(sum(point_a[m] > c for c in ctrl)),
        }
    return out


def _point(y: np.ndarray, p: np.ndarray) -> dict[str, float]:
    # here, not at import: every task's marker goes through `json_safe`, and prepare needs no sklearn (0.7 s)
    from sklearn.metrics import average_precision_score, brier_score_loss, roc_auc_score

    both = 0 < y.sum() < len(y)
    return {
        "auroc": float(roc_auc_score(y, p)) if both else math.nan,
        "auprc": float(average_precision_score(y, p)) if both else math.nan,
        "brier": float(brier_score_loss(y, p)) if len(y) else math.nan,
        "ece": expected_calibration_error(y, p),
    }


def _weighted_point(y: np.ndarray, p: np.ndarray, w: np.ndarray) -> dict[str, float]:
    """`_point` with row weights: the same weighted formulas the bootstrap replicates use."""
    if not len(y):
        return {m: math.nan for m in METRICS}
    order = np.argsort(-p, kind="stable")
    ps = p[order]
    group = np.concatenate([[0], np.cumsum(ps[1:] != ps[:-1])])
    res = _weighted_metrics(
        w[order][None, :], y[order].astype(np.float64), ps, group, int(group[-1]) + 1, _bins(ps, ECE_BINS)
    )
    return {m: float(res[m][0]) for m in METRICS}


def expected_calibration_error(y_true: np.ndarray, y_prob: np.ndarray, n_bins: int = ECE_BINS) -> float:
    """ECE: sum over equal-width probability bins of |mean label - mean probability| x bin share.

    >>> expected_calibration_error(np.array([0, 1]), np.array([0.0, 1.0]))
    0.0
    """
    y = np.asarray(y_true, dtype=np.float64)
    p = np.asarray(y_prob, dtype=np.float64)
    if not len(y):
        return math.nan
    b = _bins(p, n_bins)
    gap = np.bincount(b, weights=y - p, minlength=n_bins)
    return float(np.abs(gap).sum() / len(y))


def _bins(p: np.ndarray, n_bins: int) -> np.ndarray:
    return np.clip((p * n_bins).astype(np.int64), 0, n_bins - 1)


def bootstrap(
    y: np.ndarray,
    p: np.ndarray,
    subject_ids: np.ndarray,
    n_boot: int,
    seed: int,
    sample_weight: np.ndarray | None = None,
) -> dict[str, np.ndarray]:
    """Each metric on `n_boot` subject-level bootstrap replicates (NaN where undefined); rows weigh
    their subject's draw count times their `sample_weight`."""
    subjects, row_subject = np.unique(subject_ids, return_inverse=True)
    rng = np.random.default_rng(seed)
    counts = rng.multinomial(len(subjects), np.full(len(subjects), 1.0 / len(subjects)), size=n_boot)
    order = np.argsort(-p, kind="stable")  # descending score, as sklearn's curves
    ys, ps, rs = y[order].astype(np.float64), p[order], row_subject[order]
    sws = None if sample_weight is None else np.asarray(sample_weight, np.float64)[order]
    group = np.concatenate([[0], np.cumsum(ps[1:] != ps[:-1])]) if len(ps) else np.zeros(0, np.int64)
    n_groups = int(group[-1]) + 1 if len(group) else 0
    onehot_bins = _bins(ps, ECE_BINS)
    out = {m: np.empty(n_boot) for m in METRICS}
    step = max(1, _CHUNK_CELLS // max(len(y), 1))
    for a in range(0, n_boot, step):
        w = counts[a : a + step][:, rs].astype(np.float64)  # [b, n] row weights
        if sws is not None:
            w *= sws
        res = _weighted_metrics(w, ys, ps, group, n_groups, onehot_bins)
        for m in METRICS:
            out[m][a : a + step] = res[m]
    return out


def _weighted_metrics(
    w: np.ndarray, y: np.ndarray, p: np.ndarray, group: np.ndarray, n_groups: int, bins: np.ndarray
) -> dict[str, np.ndarray]:
    """Weighted AUROC / AP / Brier / ECE for each row of `w` (rows sorted by descending score)."""
    wp, wn = w * y, w * (1.0 - y)
    gp = _group_sum(wp, group, n_groups)  # [b, g] positive weight per tie group
    gn = _group_sum(wn, group, n_groups)
    P, N = gp.sum(1), gn.sum(1)
    cp = np.cumsum(gp, 1)  # positives scored >= this group's score
    cn = np.cumsum(gn, 1)
    with np.errstate(invalid="ignore", divide="ignore"):
        # AUROC: each negative counts the positives above it, plus half of those tied with it.
        auroc = ((cp - gp) * gn + 0.5 * gp * gn).sum(1) / (P * N)
        precision = np.where(cp + cn > 0, cp / (cp + cn), 0.0)
        ap = (gp * precision).sum(1) / P
        W = w.sum(1)
        brier = (w * (y - p) ** 2).sum(1) / W
        ece_gap = np.stack([(w * (y - p) * (bins == k)).sum(1) for k in range(ECE_BINS)], 1)
        ece = np.abs(ece_gap).sum(1) / W
    valid = (P > 0) & (N > 0)
    return {"auroc": np.where(valid, auroc, np.nan), "auprc": np.where(valid, ap, np.nan), "brier": brier, "ece": ece}


def _group_sum(w: np.ndarray, group: np.ndarray, n_groups: int) -> np.ndarray:
    """Sum the columns of `w` per tie group (groups are contiguous: a reduceat)."""
    if w.shape[1] == 0:
        return np.zeros((w.shape[0], 0))
    starts = np.flatnonzero(np.concatenate([[True], group[1:] != group[:-1]]))
    return np.add.reduceat(w, starts, axis=1)


def format_metric(m: dict, digits: int = 3) -> str:
    """`0.812 [0.790, 0.834]` (or `n/a`) for one metric's dict."""
    v, lo, hi = m.get("value"), m.get("ci_low"), m.get("ci_high")
    if v is None or (isinstance(v, float) and math.isnan(v)):
        return "n/a"
    if lo is None or hi is None or math.isnan(lo) or math.isnan(hi):
        return f"{v:.{digits}f}"
    return f"{v:.{digits}f} [{lo:.{digits}f}, {hi:.{digits}f}]"


def format_ci(m: dict, signed: bool = False, digits: int = 3) -> str:
    """`0.812 [0.790, 0.834]`, or `+0.021 [-0.004, +0.046]` with `signed` (a difference), as written.

    Unlike `format_metric`, no `n/a`: a NaN prints as `nan`, as the report tables always have."""
    f = f"+.{digits}f" if signed else f".{digits}f"
    return f"{m['value']:{f}} [{m['ci_low']:{f}}, {m['ci_high']:{f}}]"


def json_safe(obj):
    """Replace NaN/inf floats by None recursively, so metrics.json is strict JSON."""
    if isinstance(obj, dict):
        return {str(k): json_safe(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [json_safe(v) for v in obj]
    if isinstance(obj, (np.floating, float)):
        f = float(obj)
        return f if math.isfinite(f) else None
    if isinstance(obj, np.integer):
        return int(obj)
    if isinstance(obj, np.bool_):
        return bool(obj)
    return obj
