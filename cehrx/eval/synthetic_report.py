"""The synthetic-data report: `report.md` with PNG figures, from the metrics and the patient sets.

Every figure overlays the real training data with each synthetic set (the model's samples and,
when asked, the marginal baseline), so the model's advantage is visible at a glance.
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
    fig, axes = plt.subplots(2, 3, figsize=(13, 7))
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
        lo, hi = np.quantile(np.concatenate(list(data.values())) if pooled.size else [0, 1], [0.0, 0.995])
        bins = np.linspace(lo, hi if hi > lo else lo + 1, 40)
        for n, v in data.items():
            ax.hist(v, bins=bins, density=True, histtype="step", lw=1.4, label=n, color=_color(n, names))
        ax.set(title=title, xlabel="log10(1 + x)" if log else "")
    _death_axis(axes.ravel()[-1], groups, names)
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


# ------------------------------------------------------------------------------- markdown


def fmt_value(x: object, digits: int = 3) -> str:
    """A metric for a markdown cell: 3 decimals, `–` when missing or NaN."""
    if x is None:
        return "–"
    if isinstance(x, float):
        return "–" if math.isnan(x) else f"{x:.{digits}f}"
    return str(x)


SUMMARY_ROWS = [
    ("patients", ("n_patients",), "count"),
    ("prevalence Pearson ↑", ("fidelity", "prevalence", "pearson"), "1 = same code frequencies"),
    ("prevalence Spearman ↑", ("fidelity", "prevalence", "spearman"), ""),
    ("co-occurrence Pearson ↑", ("fidelity", "cooccurrence", "pearson"), "phi matrices of the top codes"),
    ("age at first visit KS ↓", ("fidelity", "distributions", "age_at_first_visit", "ks"), ""),
    ("visits per patient KS ↓", ("fidelity", "distributions", "visits_per_patient", "ks"), ""),
    ("tokens per patient KS ↓", ("fidelity", "distributions", "tokens_per_patient", "ks"), ""),
    ("days between visits KS ↓", ("fidelity", "distributions", "days_between_visits", "ks"), ""),
    ("gender TVD ↓", ("fidelity", "distributions", "gender", "tvd"), ""),
    ("race TVD ↓", ("fidelity", "distributions", "race", "tvd"), ""),
    ("visit types TVD ↓", ("fidelity", "distributions", "visit_types", "tvd"), ""),
    ("death rate |diff| ↓", ("fidelity", "distributions", "death_rate", "abs_diff"), ""),
    ("lab values mean KS ↓", ("fidelity", "labs", "mean_ks"), "top labs by value count"),
    ("TSTR/TRTR AUROC ratio (mean) ↑", ("utility", "mean_ratio"), "1 = as useful as real data"),
    ("MIA AUC (0.5 best)", ("privacy", "membership_inference", "auc"), "distance attack"),
    ("MIA accuracy (0.5 best)", ("privacy", "membership_inference", "accuracy"), ""),
    ("AA_train (0.5 best)", ("privacy", "adversarial", "aa_train"), ""),
    ("AA_test (0.5 best)", ("privacy", "adversarial", "aa_test"), ""),
    ("AA privacy loss (≈0 best)", ("privacy", "adversarial", "privacy_loss"), "AA_test - AA_train"),
    (
        "attribute inference F1 gain (≤0 best)",
        ("privacy", "attribute_inference", "f1_gain"),
        "vs real leave-one-out baseline",
    ),
    ("DCR median (to train)", ("privacy", "dcr", "median"), "Jaccard distance"),
    ("DCR = 0 rate", ("privacy", "dcr", "zero_rate"), "same codes + demographics as a train patient"),
    ("exact copy rate", ("privacy", "exact_copies", "rate_full_sequence"), "whole token sequence"),
    ("exact copy rate, ignoring YEAR/AGE", ("privacy", "exact_copies", "rate_ignoring_year_age"), ""),
]


def value_at(d: dict, path: tuple[str, ...]) -> object:
    """`d[path[0]][path[1]]...`, or None where a key is missing (a set may lack a section)."""
    for k in path:
        if not isinstance(d, dict) or k not in d:
            return None
        d = d[k]
    return d


def summary_table(metrics: dict) -> str:
    names = list(metrics["sets"])
    ref = metrics.get("reference", {})
    lines = [
        "| metric | " + " | ".join(names) + " | real held-out (reference) | note |",
        "|---|" + "---|" * (len(names) + 2),
    ]
    for label, path, note in SUMMARY_ROWS:
        vals = [fmt_value(value_at(metrics["sets"][n], path)) for n in names]
        lines.append(f"| {label} | " + " | ".join(vals) + f" | {fmt_value(value_at(ref, path))} | {note} |")
    return "\n".join(lines)


def write_markdown(out: Path, metrics: dict, figures: dict[str, str | None]) -> Path:
    real = metrics["real"]
    parts = [
        "# Synthetic data report",
        "",
        f"Real data: `{real['prepared_dir']}` — train split ({real['n_train']} patients) for fidelity and as "
        f"training members; `{real['non_member_split']}` split ({real['n_non_members']} patients) as non-members.",
        "",
        "Synthetic sets: "
        + ", ".join(f"**{n}** (`{s['dir']}`, {s['n_patients']} patients)" for n, s in metrics["sets"].items())
        + ".",
        "",
        "## Summary",
        "",
        summary_table(metrics),
        "",
        "The reference column scores the real non-member patients as if they were a synthetic set: "
        "it is what an ideal generator (fresh patients from the same population) would get, "
        "including the sampling noise of a set that size.",
        "",
        "## Fidelity",
        "",
        "Patient-level prevalence of every code (fraction of patients with the code at least once):",
        "",
        f"![prevalence]({figures['prevalence']})",
        "",
        f"Co-occurrence (phi correlation of code presence) of the {metrics['config']['top_codes']} most prevalent real codes:",
        "",
        f"![co-occurrence]({figures['cooccurrence']})",
        "",
        "Demographics and utilisation (KS statistic and Wasserstein-1 distance for numeric, total variation distance for categorical):",
        "",
        f"![distributions]({figures['distributions']})",
        "",
        f"![categorical]({figures['categorical']})",
        "",
        _distribution_table(metrics),
    ]
    if figures.get("labs"):
        parts += [
            "",
            "Values of the commonest labs (MEDS `numeric_value`; synthetic values are drawn inside the sampled decile):",
            "",
            f"![labs]({figures['labs']})",
            "",
            _labs_table(metrics),
        ]
    parts += ["", "## Utility", "", _utility_text(metrics)]
    if figures.get("utility"):
        parts += ["", f"![utility]({figures['utility']})"]
    parts += ["", "## Privacy", "", PRIVACY_TEXT, "", f"![dcr]({figures['dcr']})", "", _privacy_table(metrics), ""]
    path = out / "report.md"
    path.write_text("\n".join(parts) + "\n")
    return path


PRIVACY_TEXT = """Patients are binary vectors of code presence plus one-hot gender, race and 10-year age band;
distance is Jaccard. **MIA**: members (train) and non-members are called members when their distance
to the closest synthetic patient is small; AUC and balanced accuracy (0.5 = no leak).
**AA** (nearest-neighbour adversarial accuracy): ~0.5 means real and synthetic patients are mixed;
privacy loss = AA_test − AA_train. **Attribute inference**: demographics and the most common codes
are known; the other codes of a training patient are read off its nearest synthetic patient,
compared with the same attack on the other real training patients (leave-one-out). **Exact copies**: synthetic token sequences that
equal a training sequence (full, or ignoring the prompt's YEAR and AGE, which a generator conditioned
on real prompts reproduces by design)."""


def _distribution_table(metrics: dict) -> str:
    names = list(metrics["sets"])
    lines = ["| distribution | distance | " + " | ".join(names) + " |", "|---|---|" + "---|" * len(names)]
    for key in [*NUMERIC, *CATEGORICAL]:
        dist = "tvd" if key in CATEGORICAL else "ks"
        lines.append(
            f"| {key} | {dist.upper()} | "
            + " | ".join(
                fmt_value(value_at(metrics["sets"][n], ("fidelity", "distributions", key, dist))) for n in names
            )
            + " |"
        )
        if key in NUMERIC:
            lines.append(
                f"| {key} | W1 | "
                + " | ".join(
                    fmt_value(value_at(metrics["sets"][n], ("fidelity", "distributions", key, "wasserstein")))
                    for n in names
                )
                + " |"
            )
    return "\n".join(lines)


def _labs_table(metrics: dict) -> str:
    names = list(metrics["sets"])
    first = metrics["sets"][names[0]]["fidelity"].get("labs", {}).get("codes", {})
    lines = ["| lab | real n | " + " | ".join(f"{n} KS" for n in names) + " |", "|---|---|" + "---|" * len(names)]
    for code, m in first.items():
        lines.append(
            f"| {code} | {m['n_real']} | "
            + " | ".join(
                fmt_value(value_at(metrics["sets"][n], ("fidelity", "labs", "codes", code, "ks"))) for n in names
            )
            + " |"
        )
    return "\n".join(lines)


def _utility_text(metrics: dict) -> str:
    names = list(metrics["sets"])
    skipped = metrics.get("utility_skipped")
    if skipped:
        return f"Not computed: {skipped}"
    tasks = sorted({t for n in names for t in (metrics["sets"][n].get("utility", {}).get("tasks", {}) or {})})
    lines = [
        "Count-based classifier (probe) trained on real train (TRTR) or on a synthetic set (TSTR), tested on real "
        f"`{metrics['real']['non_member_split']}` patients; labels from the same ACES task definitions on each data set.",
        "",
        "| task | TRTR AUROC [95% CI] | " + " | ".join(f"{n} TSTR AUROC [95% CI] | {n} ratio" for n in names) + " |",
        "|---|---|" + "---|---|" * len(names),
    ]
    notes: dict[str, str] = {}
    for t in tasks:
        trtr = None
        cells = []
        for n in names:
            m = metrics["sets"][n].get("utility", {}).get("tasks", {}).get(t, {})
            if trtr is None and m.get("trtr_auroc") is not None:
                ci = m.get("trtr_auroc_ci") or (None, None)
                trtr = f"{fmt_value(m['trtr_auroc'])} [{fmt_value(ci[0])}, {fmt_value(ci[1])}]"
            if "auroc" in m:
                lo, hi = m.get("auroc_ci") or (None, None)
                cells += [f"{fmt_value(m['auroc'])} [{fmt_value(lo)}, {fmt_value(hi)}]", fmt_value(m.get("ratio"))]
            else:
                cells += ["skipped", "–"]
                if m.get("skipped"):
                    notes.setdefault(f"{t} ({n})" if "synthetic labels" in m["skipped"] else t, m["skipped"])
        lines.append("| " + " | ".join([t, trtr or "–"] + cells) + " |")
    if notes:
        lines += ["", "Skipped:", *[f"- {k}: {v}" for k, v in notes.items()]]
    return "\n".join(lines)


def _privacy_table(metrics: dict) -> str:
    names = list(metrics["sets"])
    lines = ["| | " + " | ".join(names) + " |", "|---|" + "---|" * len(names)]
    rows = [
        ("MIA members / non-members", ("privacy", "membership_inference", "n_members")),
        ("MIA member DCR median", ("privacy", "membership_inference", "member_dcr_median")),
        ("MIA non-member DCR median", ("privacy", "membership_inference", "non_member_dcr_median")),
        ("AA_train sample size (each set)", ("privacy", "adversarial", "n_train")),
        ("AA_test sample size (each set)", ("privacy", "adversarial", "n_test")),
        ("attr. inference F1 (synthetic)", ("privacy", "attribute_inference", "synthetic", "f1")),
        ("attr. inference F1 (real baseline)", ("privacy", "attribute_inference", "real_baseline", "f1")),
        ("held-out exact copy rate (base rate)", ("privacy", "exact_copies", "held_out_rate_full_sequence")),
        ("held-out exact copy rate ignoring YEAR/AGE", ("privacy", "exact_copies", "held_out_rate_ignoring_year_age")),
    ]
    for label, path in rows:
        lines.append(f"| {label} | " + " | ".join(fmt_value(value_at(metrics["sets"][n], path)) for n in names) + " |")
    return "\n".join(lines)
