"""Tables for experiments/finetune/RESULTS.md from the study's metrics.json files.

python experiments/finetune/summarize.py [runs/finetune]
"""

from __future__ import annotations

import json
import sys
from pathlib import Path


def cell(m: dict) -> str:
    return f"{m['value']:.3f} [{m['ci_low']:.3f}, {m['ci_high']:.3f}]"


def diff(d: dict | None) -> str:
    return "" if not d else f"{d['auroc']['value']:+.3f} [{d['auroc']['ci_low']:+.3f}, {d['auroc']['ci_high']:+.3f}]"


def _step(info: dict) -> str:
    """`, step s of n` when the run checked inside epochs (`finetune.checks_per_epoch`)."""
    if "best_step" not in info or "steps_per_epoch" not in info:
        return ""
    return f", step {info['best_step']}/{info['steps_per_epoch']}"


def _wise(info: dict) -> str:
    """`, α a` when the run blended its weights with the start's (`finetune.wise_alphas`); α = 0 is the start."""
    return f", α {info['wise_ft']['alpha']:g}" if "wise_ft" in info else ""


def main(root: Path) -> None:
    runs = sorted(root.glob("*/*/metrics.json"))
    print(
        "| task | method | k | fine-tuned AUROC | probe | counts | ft - probe | ft - counts | trainable | epochs (best, WiSE α) | s |"
    )
    print("|---|---|---|---:|---:|---:|---:|---:|---:|---:|---:|")
    lora_vs_full: dict[str, dict[str, float]] = {}
    for path in runs:
        r = json.loads(path.read_text())
        method, task = path.parent.parent.name, path.parent.name
        for k, b in r["budgets"].items():
            m, i = b["methods"], b["finetune"]
            get = lambda name: cell(m[name]["auroc"]) if name in m else ""  # noqa: E731
            print(
                f"| {task.removeprefix('synthea20k_')} | {method} | {k} | {get('finetune')} | {get('probe')} | {get('counts')} | "
                f"{diff(b['paired'].get('finetune - probe'))} | {diff(b['paired'].get('finetune - counts'))} | "
                f"{100 * i['parameters']['trainable_fraction']:.2f} % | {i['epochs_run']} ({i['best_epoch']}{_step(i)}{_wise(i)}) | {i['seconds']:.0f} |"
            )
            lora_vs_full.setdefault(f"{task} k={k}", {})[method] = m["finetune"]["auroc"]["value"]
    print("\n| task | LoRA - full (AUROC) |\n|---|---:|")
    for key, v in lora_vs_full.items():
        if {"full", "lora"} <= set(v):
            print(f"| {key} | {v['lora'] - v['full']:+.3f} |")


if __name__ == "__main__":
    main(Path(sys.argv[1] if len(sys.argv) > 1 else "runs/finetune"))
