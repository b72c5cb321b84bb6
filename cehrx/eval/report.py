"""The short markdown report shared by probe and zero-shot: a metrics table with CIs and a ROC plot.

`write_report(out_dir, title, rows, curves)` writes `report.md` and `roc.png`; extra markdown
sections (a few-shot table, notes on dropped labels) go in `sections`.
"""

from __future__ import annotations

import os
import uuid
from pathlib import Path

import numpy as np

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
    ax.legend(loc="lower right", fontsize=7)
    fig.tight_layout()
    tmp = path.with_name(f".{path.name}.tmp-{uuid.uuid4().hex[:8]}.png")
    fig.savefig(tmp)
    plt.close(fig)
    os.replace(tmp, path)
    return path


def write_report(
    out_dir: str | Path,
    title: str,
    rows: dict[str, dict],
    curves: dict[str, tuple[np.ndarray, np.ndarray]],
    *,
    sections: dict[str, str] | None = None,
) -> Path:
    """Write `<out_dir>/report.md` (table with 95 % CIs + ROC plot + extra sections) and `roc.png`."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    roc = plot_roc(out / "roc.png", curves, title)
    parts = [f"# {title}", "", "Held-out metrics; 95 % CIs from a subject-level bootstrap.", "", metrics_table(rows), ""]
    if roc is not None:
        parts += ["![ROC curves](roc.png)", ""]
    for name, body in (sections or {}).items():
        parts += [f"## {name}", "", body.rstrip(), ""]
    path = out / "report.md"
    tmp = path.with_name(f".report.md.tmp-{uuid.uuid4().hex[:8]}")
    tmp.write_text("\n".join(parts))
    os.replace(tmp, path)
    return path
