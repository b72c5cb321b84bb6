"""The short markdown report shared by probe and zero-shot: a metrics table with CIs, ROC and reliability plots.

`write_report(out_dir, title, rows, curves)` writes `report.md`, `roc.png` and `calibration.png`;
extra markdown sections (a few-shot table, notes on dropped labels) go in `sections`.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

from cehrx.data.atomic import atomic_file, write_text
from cehrx.eval.metrics import METRICS, format_metric

HEADERS = {"auroc": "AUROC", "auprc": "AUPRC", "brier": "Brier", "ece": "ECE"}


def metrics_table(rows: dict[str, dict]) -> str:
    """Markdown table: one row per method, each metric as `value [ci_low, ci_high]`."""
    head = "| method | " + " | ".join(HEADERS[m] for m in METRICS) + " | n | n_pos |"
    sep = "|---|" + "---:|" * (len(METRICS) + 2)
    lines = [head, sep]
    for method, m in rows.items():
        cells = [format_metric(m.get(k, {})) for k in METRICS]
        lines.append(f"| {method} | " + " | ".join(cells) + f" | {m.get('n', '')} | {m.get('n_pos', '')} |")
    return "\n".join(lines)


def plot_roc(path: Path, curves: dict[str, tuple[np.ndarray, np.ndarray]], title: str) -> Path | None:
    """ROC curves of every method on one plot (PNG, headless backend). None if no curve is defined."""
    import matplotlib

    matplotlib.use("Agg", force=False)
    import matplotlib.pyplot as plt
    from sklearn.metrics import roc_auc_score, roc_curve

    fig, ax = plt.subplots(figsize=(5, 5), dpi=120)
    drawn = 0
    for method, (y, p) in curves.items():
        y = np.asarray(y).astype(bool)
        if not 0 < y.sum() < len(y):
            continue
        fpr, tpr, _ = roc_curve(y, p)
        ax.plot(fpr, tpr, label=f"{method} (AUROC {roc_auc_score(y, p):.3f})", lw=1.5)
        drawn += 1
    if not drawn:
        plt.close(fig)
        return None
    ax.plot([0, 1], [0, 1], ls="--", c="grey", lw=1)
    ax.set(xlabel="false positive rate", ylabel="true positive rate", title=title, xlim=(0, 1), ylim=(0, 1))
    return _save(fig, ax, path)


def plot_reliability(
    path: Path,
    curves: dict[str, tuple[np.ndarray, np.ndarray]],
    title: str,
    n_bins: int = 10,
    sample_weight: np.ndarray | None = None,
) -> Path | None:
    """Reliability diagram: per method, labels in `n_bins` bins of equal size by predicted risk, the bin's
    mean prediction against its observed rate (weighted by `sample_weight`, e.g. a case-control sample's
    inverse sampling probabilities, so the rates are those of the population). Log-log axes: clinical
    risks are mostly small. None if nothing could be drawn."""
    import matplotlib

    matplotlib.use("Agg", force=False)
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(5, 5), dpi=120)
    lo, drawn = 1.0, 0
    for method, (y, p) in curves.items():
        y, p = np.asarray(y, dtype=float), np.asarray(p, dtype=float)
        w = np.ones_like(p) if sample_weight is None else np.asarray(sample_weight, dtype=float)
        if len(p) < n_bins or not 0 < y.sum() < len(y):
            continue
        order = np.argsort(p, kind="stable")
        bins = np.array_split(order, n_bins)
        mp = np.array([np.average(p[b], weights=w[b]) for b in bins])
        my = np.array([np.average(y[b], weights=w[b]) for b in bins])
        ok = (mp > 0) & (my > 0)
        ax.plot(mp[ok], my[ok], marker="o", ms=3, lw=1.2, label=method)
        lo = min(lo, float(mp[ok].min(initial=1)), float(my[ok].min(initial=1)))
        drawn += 1
    if not drawn:
        plt.close(fig)
        return None
    lo = max(lo / 2, 1e-5)
    ax.plot([lo, 1], [lo, 1], ls="--", c="grey", lw=1)
    ax.set(
        xscale="log",
        yscale="log",
        xlim=(lo, 1),
        ylim=(lo, 1),
        xlabel="mean predicted risk (bin)",
        ylabel="observed rate (bin)",
        title=f"{title}: reliability",
    )
    return _save(fig, ax, path)


def _save(fig, ax, path: Path) -> Path:
    """Legend, layout, then the PNG written atomically; the figure is closed."""
    import matplotlib.pyplot as plt

    ax.legend(loc="lower right", fontsize=7)
    fig.tight_layout()
    with atomic_file(path) as tmp:
        fig.savefig(tmp, format="png")
    plt.close(fig)
    return path


def write_report(
    out_dir: str | Path,
    title: str,
    rows: dict[str, dict],
    curves: dict[str, tuple[np.ndarray, np.ndarray]],
    *,
    sections: dict[str, str] | None = None,
    sample_weight: np.ndarray | None = None,
) -> Path:
    """Write `<out_dir>/report.md` (table with 95 % CIs + ROC and reliability plots + extra sections),
    `roc.png` and `calibration.png` (`sample_weight`: label weights for the reliability diagram)."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    roc = plot_roc(out / "roc.png", curves, title)
    cal = plot_reliability(out / "calibration.png", curves, title, sample_weight=sample_weight)
    parts = [
        f"# {title}",
        "",
        "Held-out metrics; 95 % CIs from a subject-level bootstrap.",
        "",
        metrics_table(rows),
        "",
    ]
    if roc is not None:
        parts += ["![ROC curves](roc.png)", ""]
    if cal is not None:
        parts += ["![Reliability: mean predicted risk vs observed rate in 10 equal-size bins](calibration.png)", ""]
    for name, body in (sections or {}).items():
        parts += [f"## {name}", "", body.rstrip(), ""]
    path = out / "report.md"
    return write_text(path, "\n".join(parts))
