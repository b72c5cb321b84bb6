"""A `-m` sweep's one table: every job's selection metric, best first (a Hydra callback).

Why: a sweep over `finetune.lr` or `model.lr` leaves one directory per job
(`<output_dir>/multirun/<overrides>`), and the question it was run for, which setting wins, needs each
job's `metrics.json` opened. At the end of the sweep (`on_multirun_end`, in the launching process, also
after SLURM jobs) `SweepSummary` writes `<sweep dir>/sweep_summary.md` and `.json`: one row per job, ranked
by the metric the task selects on. The ranking uses what the task would select with, never the held-out
score: fine-tuning's tuning-split AUROC of its largest budget (`best_val`), pretraining's validation loss.
Held-out numbers are shown beside it, not ranked on. Other tasks are listed unranked.
"""

from __future__ import annotations

import json
import logging
import math
from pathlib import Path
from typing import Any

from hydra.experimental.callback import Callback
from omegaconf import DictConfig

from cehrx.data.atomic import atomic_file

log = logging.getLogger("cehrx")


class SweepSummary(Callback):
    def on_multirun_end(self, config: DictConfig, **kwargs: Any) -> None:
        root = Path(config.hydra.sweep.dir)
        if root.is_dir():
            rows = summarize(root)
            if any(r["finished"] for r in rows):  # prepare's shard/stage jobs all write one output: no job dir has one
                write_summary(root, rows)


def selection(metrics: dict[str, Any]) -> dict[str, Any]:
    """The job's selection metric (`select`, with `higher_is_better`) and held-out numbers to show beside it."""
    if "budgets" in metrics:  # finetune: the largest budget, chosen on its tuning AUROC
        k, b = list(metrics["budgets"].items())[-1]
        info, methods = b.get("finetune", {}), b.get("methods", {})
        held = {f"held-out AUROC {m}": v["auroc"]["value"] for m, v in methods.items() if "auroc" in v}
        name = f"tuning {'AUROC' if info.get('monitor') == 'val_auroc' else 'loss'} (k={k})"
        return {"metric": name, "select": info.get("best_val"), "higher_is_better": "AUROC" in name, **held}
    if "val/loss" in metrics:  # pretrain
        return {"metric": "val/loss", "select": metrics["val/loss"], "higher_is_better": False}
    return {"metric": None, "select": None, "higher_is_better": True}


def summarize(root: Path) -> list[dict[str, Any]]:
    """One row per job directory under `root` (jobs without a metrics.json included, without numbers), best first.
    The sweep dir is stable (`<output_dir>/multirun`), so the jobs of an earlier sweep into it are listed too."""
    rows = []
    for job in sorted(p for p in root.iterdir() if p.is_dir()):
        path = job / "metrics.json"
        row = {"job": job.name, "finished": path.is_file()}
        if path.is_file():
            row.update(selection(json.loads(path.read_text())))
        rows.append(row)
    ranked = [r for r in rows if _number(r.get("select"))]
    higher = bool(ranked and ranked[0]["higher_is_better"])
    ranked.sort(key=lambda r: r["select"], reverse=higher)
    return ranked + [r for r in rows if not _number(r.get("select"))]


def write_summary(root: Path, rows: list[dict[str, Any]]) -> None:
    extra = sorted({k for r in rows for k in r if k.startswith("held-out")})
    metric = next((r["metric"] for r in rows if r.get("metric")), "selection metric")
    lines = [f"| job | {metric} | " + " | ".join(extra) + " |", "|---|---:|" + "---:|" * len(extra)]
    for r in rows:
        cells = [_fmt(r.get("select")) if r["finished"] else "no metrics.json"] + [_fmt(r.get(k)) for k in extra]
        lines.append(f"| {r['job']} | " + " | ".join(cells) + " |")
    best = "\n\nBest: " + rows[0]["job"] if _number(rows[0].get("select")) else ""
    text = f"# Sweep summary: {root}\n\nRanked by {metric} (held-out numbers are shown, not ranked on).\n\n"
    for name, body in (
        ("sweep_summary.md", text + "\n".join(lines) + best + "\n"),
        ("sweep_summary.json", json.dumps(rows, indent=2)),
    ):
        with atomic_file(root / name) as tmp:
            tmp.write_text(body)
    log.info("sweep summary: %s", root / "sweep_summary.md")


def _number(v: Any) -> bool:
    return isinstance(v, (int, float)) and math.isfinite(v)


def _fmt(v: Any) -> str:
    return f"{v:.4f}" if _number(v) else ""
