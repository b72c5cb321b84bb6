"""The probe report's sections (`report.md` beside the metrics table), from metrics.json's content."""

from __future__ import annotations

from cehrx.eval.metrics import format_ci

__all__ = ["report_sections", "report_title"]


def report_title(source: dict) -> str:
    return f"Linear probe: {source.get('task') or source.get('labels_dir')}"


def report_sections(result: dict) -> dict[str, str]:
    """`Data` always; random-init spread, paired differences and few-shot when the result has them."""
    sections = {"Data": data_section(result)}
    ri = result.get("random_init_seeds")
    if ri and len(ri["auroc"]) > 1:
        sections["Pretrained vs random init"] = random_init_section(ri)
    if result.get("paired"):
        sections["Paired differences (same subject-bootstrap draws)"] = paired_section(result["paired"])
    if result["few_shot"]:
        sections["Few-shot (held-out AUROC, mean ± sd over repeats)"] = few_shot_section(result["few_shot"])
    return sections


def data_section(result: dict) -> str:
    """Labels in / used / dropped, per split, the protocol, what was scored, and the histories."""
    lab = result["labels"]
    rows = [
        f"- labels: {lab['in']} in, {lab['used']} used ({lab['positives']} positive); dropped: "
        + (", ".join(f"{k} {v}" for k, v in lab["dropped"].items() if v) or "none")
    ]
    for s, d in lab["by_split"].items():
        rows.append(f"- {s}: {d['n']} labels ({d['n_pos']} positive), {d['subjects']} subjects")
    ev = result["evaluation"]
    rows.append(
        f"- evaluation: {'fit on train + tuning, scored on held_out' if ev == 'split' else ev + ' subject-grouped cross-fitting over all labels (held_out too small)'}"
    )
    rows += _scored_rows(result)
    rows.append(
        f"- histories: up to {result['history']['max_len']} tokens ({result['history']['mean_tokens']:.0f} on average), "
        f"{result['history'].get('truncated', 0)} left-truncated; pooling {result['history']['pooling']}"
    )
    if result.get("description"):
        rows.insert(0, f"- task: {result['description']}")
    return "\n".join(rows)


def _scored_rows(result: dict) -> list[str]:
    """The scored labels, a note when some are of pretraining subjects, and the split's labels alone (cross-fitting)."""
    sc = result["scored"]
    rows = [
        f"- scored: {sc['labels']} labels ({sc['positives']} positive) from {sc['subjects']} subjects "
        f"({sc['positive_subjects']} with a positive label)"
    ]
    if sc["pretraining_labels"]:
        rows.append(
            f"- **note**: {sc['pretraining_labels']} scored labels ({sc['pretraining_subjects']} subjects) are from the `train` split "
            "the model was pretrained on; it saw their whole timelines, outcomes included, which favours the pretrained "
            "embedding over random init and the count baselines"
        )
    only = result.get("split_only")
    if only:
        shown = [f"{name} {format_ci(m['auroc'])}" for name, m in only["methods"].items() if m is not None]
        rows.append(
            f"- {only['split']} labels alone ({only['labels']}, {only['positives']} positive; predictions.parquet holds "
            f"these only): AUROC " + ("; ".join(shown) if shown else "not defined (one class)")
        )
    return rows


def random_init_section(ri: dict) -> str:
    """The random-init controls' AUROC over seeds, and where the probe stands against them."""
    return (
        f"- random init over {len(ri['auroc'])} seeds ({', '.join(map(str, ri['seeds']))}): AUROC {ri['auroc_mean']:.3f} ± {ri['auroc_sd']:.3f} "
        f"({', '.join(f'{a:.3f}' for a in ri['auroc'])})\n"
        f"- probe {ri['probe_auroc']:.3f}: {ri['probe_minus_mean']:+.3f} vs the mean; above {ri['probe_beats']} of {len(ri['auroc'])} seeds"
    )


def paired_section(paired: dict) -> str:
    lines = ["| comparison | AUROC difference [95% CI] | AUPRC difference [95% CI] |", "|---|---:|---:|"]
    for name, d in paired.items():
        cells = [format_ci(d[m], signed=True) for m in ("auroc", "auprc")]
        lines.append(f"| {name} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def few_shot_section(curves: dict) -> str:
    ks = [r["k"] for r in next(iter(curves.values()))]
    lines = ["| method | " + " | ".join(f"k={k}" for k in ks) + " |", "|---|" + "---:|" * len(ks)]
    for name, curve in curves.items():
        cells = [f"{r['auroc']:.3f} ± {r['auroc_sd']:.3f}" if r["auroc_sd"] else f"{r['auroc']:.3f}" for r in curve]
        lines.append(f"| {name} | " + " | ".join(cells) + " |")
    return "\n".join(lines)
