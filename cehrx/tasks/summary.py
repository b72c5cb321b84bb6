"""The headline numbers of a pipeline run, as one table (what `make demo` ends with).

Each stage writes its own JSON; this module only picks the few numbers a reader looks for
first, by key name, so a stage can add metrics without touching the summary.
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any

from rich.console import Console
from rich.table import Table

# evaluate's headline metrics: (label, key name to look for anywhere in its metrics.json)
SYNTHETIC_HEADLINES = (
    ("prevalence Pearson r", "prevalence_pearson"),
    ("membership-inference AUC", "mia_auc"),
    ("AA privacy loss", "privacy_loss"),
    ("exact-copy rate", "exact_copy_rate"),
    ("TSTR / TRTR AUROC", "tstr_trtr_ratio"),
)


def find(tree: Any, key: str, path: tuple[str, ...] = ()) -> list[tuple[tuple[str, ...], Any]]:
    """Every `(path, value)` under a key named `key` in nested dicts.

    >>> find({"a": {"mia_auc": 0.5}, "b": {"c": {"mia_auc": 0.6}}}, "mia_auc")
    [(('a',), 0.5), (('b', 'c'), 0.6)]
    """
    out: list[tuple[tuple[str, ...], Any]] = []
    if isinstance(tree, dict):
        for k, v in tree.items():
            if k == key:
                out.append((path, v))
            else:
                out += find(v, key, (*path, str(k)))
    return out


def fmt(value: Any) -> str:
    """`0.712 [0.650, 0.771]` for a metric with a CI, `0.712` for a number.

    >>> fmt({"value": 0.7123, "ci_low": 0.65, "ci_high": 0.7712})
    '0.712 [0.650, 0.771]'
    >>> fmt(3.14159)
    '3.142'
    """
    if isinstance(value, dict) and "value" in value:
        v, lo, hi = value.get("value"), value.get("ci_low"), value.get("ci_high")
        if lo is None or hi is None or any(isinstance(x, float) and math.isnan(x) for x in (lo, hi)):
            return fmt(v)
        return f"{v:.3f} [{lo:.3f}, {hi:.3f}]"
    if isinstance(value, float):
        return f"{value:.3f}"
    return str(value)


def rows(summaries: dict[str, Any]) -> list[tuple[str, str, str]]:
    """(stage, what, value) rows for the stages that ran."""
    out: list[tuple[str, str, str]] = []
    pre = summaries.get("pretrain") or {}
    if "val/ppl" in pre:
        out.append(
            (
                "pretrain",
                "validation perplexity (unigram baseline)",
                f"{pre['val/ppl']:.2f} ({pre.get('unigram_ppl', math.nan):.2f})",
            )
        )
    for stage in ("probe", "zeroshot"):
        for path, auroc in find(summaries.get(stage) or {}, "auroc"):
            out.append((stage, "AUROC " + "/".join(p for p in path if p not in ("metrics", "methods")), fmt(auroc)))
    evaluate = summaries.get("evaluate") or {}
    evaluate = evaluate.get("summary", evaluate)  # evaluate's headline block, one entry per synthetic set
    for label, key in SYNTHETIC_HEADLINES:
        for path, value in find(evaluate, key):
            if value is None:
                continue
            where = "/".join(p for p in path if p not in ("metrics", "privacy", "fidelity", "utility"))
            out.append(("evaluate", f"{label}{' (' + where + ')' if where else ''}", fmt(value)))
    return out


def print_summary(summaries: dict[str, Any], dirs: dict[str, Path], console: Console | None = None) -> None:
    """The headline table, then where each stage's full output is."""
    console = console or Console()
    table = Table(title="cehrx pipeline summary")
    for col in ("stage", "metric", "value"):
        table.add_column(col)
    for r in rows(summaries):
        table.add_row(*r)
    console.print(table)
    for stage in summaries:
        report = next((p for p in (dirs[stage] / "report.md", dirs[stage] / "report.html") if p.is_file()), dirs[stage])
        console.print(f"  {stage:<9} {report}")
