"""Markdown tables (AUROC with 95 % CI per method, few-shot curve) from probe output dirs.

    python experiments/probe/summarize.py runs/probe_gibleed/probe
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

from cehrx.eval.metrics import format_metric

METHODS = ("probe", "random_init", "counts", "counts_hgb")


def main(root: Path) -> None:
    runs = sorted(p.parent for p in root.glob("*/metrics.json") if "methods" in json.loads(p.read_text()))
    print("| task | held-out labels (pos) | " + " | ".join(METHODS) + " |")
    print("|---|---:|" + "---:|" * len(METHODS))
    for r in runs:
        m = json.loads((r / "metrics.json").read_text())
        ho = m["labels"]["by_split"]["held_out"]
        cells = [format_metric(m["methods"][k]["auroc"]) if k in m["methods"] else "-" for k in METHODS]
        print(f"| {r.name} | {ho['n']} ({ho['n_pos']}) | " + " | ".join(cells) + " |")
    print()
    print("| task | method | " + " | ".join(f"k={k}" for k in ("16", "64", "256", "all")) + " |")
    print("|---|---|" + "---:|" * 4)
    for r in runs:
        m = json.loads((r / "metrics.json").read_text())
        for name, curve in m.get("few_shot", {}).items():
            print(f"| {r.name} | {name} | " + " | ".join(f"{c['auroc']:.3f}" + (f" ± {c['auroc_sd']:.3f}" if c["auroc_sd"] else "") for c in curve) + " |")


if __name__ == "__main__":
    main(Path(sys.argv[1] if len(sys.argv) > 1 else "runs/probe_gibleed/probe"))
