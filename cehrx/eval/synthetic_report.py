"""The synthetic-data report: `report.md` from the metrics, linking the figures of `synthetic_figures`.

A summary table (`SUMMARY_ROWS`, one row per headline metric, one column per synthetic set plus
the real non-members as the reference), then fidelity, utility and privacy sections.
"""

from __future__ import annotations

import math
from pathlib import Path

from cehrx.eval.fidelity import CATEGORICAL, NUMERIC


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
    ("age at death KS ↓", ("fidelity", "distributions", "age_at_death", "ks"), "patients who die"),
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
