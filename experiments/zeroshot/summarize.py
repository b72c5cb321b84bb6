"""Markdown table of zero-shot runs: one row per `<dir>/*/metrics.json` (task, model, metrics with CIs).

python experiments/zeroshot/summarize.py runs/zeroshot_gibleed/zeroshot
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

from cehrx.eval.metrics import format_metric


def main(root: Path) -> None:
    print(
        "| task | model | AUROC | AUPRC | Brier | ECE | n | n_pos | futures resolved | futures with outcome | seconds |"
    )
    print("|---|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|")
    for path in sorted(root.glob("*/metrics.json")):
        m = json.loads(path.read_text())
        if m.get("method") != "zeroshot" or "run" not in m:
            continue
        run, fut = m["run"], m["futures"]
        model = "random init" if run.get("random_init") else "pretrained"
        cells = " | ".join(format_metric(m[k]) for k in ("auroc", "auprc", "brier", "ece"))
        print(
            f"| {run['task']} | {model} | {cells} | {m['n']} | {m['n_pos']} | {fut['resolved_share']:.1%} | "
            f"{fut['with_outcome_share']:.2%} | {run['seconds']:.0f} |"
        )


if __name__ == "__main__":
    main(Path(sys.argv[1] if len(sys.argv) > 1 else "runs/zeroshot_gibleed/zeroshot"))
