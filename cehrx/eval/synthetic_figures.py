"""The synthetic-data report's PNG figures, from the patient sets and the metrics.

Every figure overlays the real training data with each synthetic set (the model's samples and,
when asked, the marginal baseline), so the model's advantage is visible at a glance. Each
`plot_*` writes one PNG into `out` and returns its file name (None: nothing to draw);
`synthetic_report.write_markdown` links them.
"""

from __future__ import annotations

import math
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402

from cehrx.eval.fidelity import CATEGORICAL, NUMERIC, category_counts, code_columns, prevalence  # noqa: E402
from cehrx.eval.patients import Patients, TokenSpace  # noqa: E402

COLORS = {"real": "#222222"}
PALETTE = ["#1f77b4", "#d62728", "#2ca02c", "#9467bd"]


def _color(name: str, names: list[str]) -> str:
    """Real data in black/grey, synthetic sets in palette order (the same colour in every figure)."""
    if name.startswith("real"):
        return COLORS.get(name, "#777777")
    sets = [n for n in names if not n.startswith("real")]
    return PALETTE[sets.index(name) % len(PALETTE)]


def _save(fig: plt.Figure, path: Path) -> str:
    fig.tight_layout()
    fig.savefig(path, dpi=90)
    plt.close(fig)
    return path.name


def plot_prevalence(out: Path, real: Patients, sets: dict[str, Patients], space: TokenSpace, metrics: dict) -> str:
    cols = code_columns(space)
    pr = prevalence(real, cols)
    fig, axes = plt.subplots(1, len(sets), figsize=(4.5 * len(sets), 4.2), squeeze=False)
    floor = 0.5 / max(len(real), 1)
    for ax, (name, p) in zip(axes[0], sets.items()):
        ps = prevalence(p, cols)
        seen = (pr > 0) | (ps > 0)
        ax.scatter(
            np.maximum(pr[seen], floor), np.maximum(ps[seen], floor), s=6, alpha=0.5, color=_color(name, list(sets))
        )
        ax.plot([floor, 1], [floor, 1], color="grey", lw=0.8, ls="--")
        ax.set(
            xscale="log",
            yscale="log",
            xlabel="real prevalence (train)",
            ylabel=f"{name} prevalence",
            title=f"{name}: r={metrics[name]['fidelity']['prevalence']['pearson']:.3f}",
        )
    return _save(fig, out / "prevalence.png")


def plot_cooccurrence(out: Path, matrices: dict[str, np.ndarray]) -> str:
    fig, axes = plt.subplots(
        1, len(matrices), figsize=(3.6 * len(matrices) + 1, 3.6), squeeze=False, layout="constrained"
    )
    for ax, (name, m) in zip(axes[0], matrices.items()):
        im = ax.imshow(m, vmin=-1, vmax=1, cmap="RdBu_r")
        ax.set(title=f"{name}: top-code phi", xticks=[], yticks=[])
    fig.colorbar(im, ax=axes[0].tolist(), shrink=0.9)
    fig.savefig(out / "cooccurrence.png", dpi=90)
    plt.close(fig)
    return "cooccurrence.png"


def plot_distributions(out: Path, real: Patients, sets: dict[str, Patients]) -> str:
    groups = {"real": real, **sets}
    names = list(groups)
    cols = (len(NUMERIC) + 2) // 2  # every numeric distribution, then the death rate
    fig, axes = plt.subplots(2, cols, figsize=(4.4 * cols, 7))
    for ax in axes.ravel()[len(NUMERIC) + 1 :]:
        ax.set_visible(False)
    for ax, (title, f) in zip(axes.ravel(), NUMERIC.items()):
        values = {n: np.asarray(f(p), dtype=float) for n, p in groups.items()}
        values = {n: v[np.isfinite(v)] for n, v in values.items()}
        pooled = (
            np.concatenate([v for v in values.values() if len(v)])
            if any(len(v) for v in values.values())
            else np.array([0.0])
        )
        log = title in ("days_between_visits", "tokens_per_patient", "visits_per_patient") and pooled.min() >= 0
        data = {n: np.log10(1 + v) if log else v for n, v in values.items()}
        flat = np.concatenate(list(data.values()))  # may be empty: no patient dies in a small set
        lo, hi = np.quantile(flat, [0.0, 0.995]) if flat.size else (0.0, 1.0)
        bins = np.linspace(lo, hi if hi > lo else lo + 1, 40)
        for n, v in data.items():
            ax.hist(v, bins=bins, density=True, histtype="step", lw=1.4, label=n, color=_color(n, names))
        ax.set(title=title, xlabel="log10(1 + x)" if log else "")
    _death_axis(axes.ravel()[len(NUMERIC)], groups, names)
    axes.ravel()[0].legend(fontsize=8)
    return _save(fig, out / "distributions.png")


def _death_axis(ax: plt.Axes, groups: dict[str, Patients], names: list[str]) -> None:
    rates = [float(p.death.mean()) for p in groups.values()]
    ax.bar(names, rates, color=[_color(n, names) for n in names])
    ax.set(title="death rate")


def plot_categorical(out: Path, real: Patients, sets: dict[str, Patients], space: TokenSpace) -> str:
    groups = {"real": real, **sets}
    names = list(groups)
    fig, axes = plt.subplots(1, len(CATEGORICAL), figsize=(5 * len(CATEGORICAL), 4))
    for ax, (title, f) in zip(axes, CATEGORICAL.items()):
        counts = {n: category_counts(f(p, space), space) for n, p in groups.items()}
        cats = sorted(set().union(*counts.values()), key=lambda c: -counts["real"].get(c, 0))[:12]
        width = 0.8 / len(names)
        for i, n in enumerate(names):
            total = max(sum(counts[n].values()), 1)
            ax.bar(
                np.arange(len(cats)) + i * width,
                [counts[n].get(c, 0) / total for c in cats],
                width,
                label=n,
                color=_color(n, names),
            )
        ax.set_xticks(
            np.arange(len(cats)) + 0.4 - width / 2,
            [c.split("//")[-1][:14] for c in cats],
            rotation=45,
            ha="right",
            fontsize=8,
        )
        ax.set(title=title, ylabel="fraction")
    axes[0].legend(fontsize=8)
    return _save(fig, out / "categorical.png")


def plot_labs(out: Path, real: dict[str, np.ndarray], sets: dict[str, dict[str, np.ndarray]], k: int = 6) -> str | None:
    codes = [c for c in real if len(real[c])][:k]
    if not codes:
        return None
    names = ["real", *sets]
    ncol = min(3, len(codes))
    fig, axes = plt.subplots(
        math.ceil(len(codes) / ncol), ncol, figsize=(4.3 * ncol, 3.4 * math.ceil(len(codes) / ncol)), squeeze=False
    )
    for ax, code in zip(axes.ravel(), codes):
        lo, hi = np.quantile(real[code], [0.005, 0.995])
        bins = np.linspace(lo, hi if hi > lo else lo + 1, 40)
        for n in names:
            v = real[code] if n == "real" else sets[n].get(code, np.array([]))
            if len(v):
                ax.hist(v, bins=bins, density=True, histtype="step", lw=1.4, label=n, color=_color(n, names))
        ax.set_title(code[:40], fontsize=9)
    for ax in axes.ravel()[len(codes) :]:
        ax.axis("off")
    axes.ravel()[0].legend(fontsize=8)
    return _save(fig, out / "labs.png")


def plot_dcr(out: Path, dcr: dict[str, np.ndarray]) -> str:
    names = list(dcr)
    fig, ax = plt.subplots(figsize=(6, 4))
    bins = np.linspace(0, 1, 41)
    for n, d in dcr.items():
        ax.hist(d, bins=bins, density=True, histtype="step", lw=1.4, label=n, color=_color(n, names))
    ax.set(
        xlabel="Jaccard distance to the closest training patient", ylabel="density", title="distance to closest record"
    )
    ax.legend(fontsize=8)
    return _save(fig, out / "dcr.png")


def plot_utility(out: Path, utility: dict[str, dict]) -> str | None:
    """AUROC per task: train-on-real vs train-on-each-synthetic set, all tested on real held-out."""
    tasks = sorted({t for u in utility.values() for t, m in u.items() if isinstance(m, dict) and "auroc" in m})
    if not tasks:
        return None
    names = ["real (TRTR)", *utility]
    fig, ax = plt.subplots(figsize=(max(5, 1.8 * len(tasks)), 4))
    width = 0.8 / len(names)
    for i, n in enumerate(names):
        vals = []
        for t in tasks:
            src = next(iter(utility.values())).get(t, {}) if n == names[0] else utility[n].get(t, {})
            vals.append((src.get("trtr_auroc") if n == names[0] else src.get("auroc")) or np.nan)
        ax.bar(
            np.arange(len(tasks)) + i * width,
            vals,
            width,
            label=n,
            color=PALETTE[(i - 1) % len(PALETTE)] if i else "#222222",
        )
    ax.axhline(0.5, color="grey", lw=0.8, ls="--")
    ax.set_xticks(np.arange(len(tasks)) + 0.4 - width / 2, tasks, rotation=20, ha="right")
    ax.set(ylabel="AUROC on real held-out", ylim=(0.3, 1.0), title="utility")
    ax.legend(fontsize=8)
    return _save(fig, out / "utility.png")
