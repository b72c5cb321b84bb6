"""Markdown tables (AUROC with 95 % CI per method, few-shot curve) from probe output dirs.

python experiments/probe/summarize.py runs/probe_gibleed/probe
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq

from cehrx.eval.metrics import bootstrap, format_metric

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
    print("| task | probe | random init, mean ± sd over seeds (each seed) | probe - mean | probe above |")
    print("|---|---:|---|---:|---:|")
    for r in runs:
        ri = json.loads((r / "metrics.json").read_text()).get("random_init_seeds")
        if ri:
            each = ", ".join(f"{a:.3f}" for a in ri["auroc"])
            print(
                f"| {r.name} | {ri['probe_auroc']:.3f} | {ri['auroc_mean']:.3f} ± {ri['auroc_sd']:.3f} ({each}) | "
                f"{ri['probe_minus_mean']:+.3f} | {ri['probe_beats']} of {len(ri['auroc'])} seeds |"
            )
    print()
    print("| task | method | " + " | ".join(f"k={k}" for k in ("16", "64", "256", "all")) + " |")
    print("|---|---|" + "---:|" * 4)
    for r in runs:
        m = json.loads((r / "metrics.json").read_text())
        for name, curve in m.get("few_shot", {}).items():
            print(
                f"| {r.name} | {name} | "
                + " | ".join(f"{c['auroc']:.3f}" + (f" ± {c['auroc_sd']:.3f}" if c["auroc_sd"] else "") for c in curve)
                + " |"
            )

    print()
    print("| task | pair | AUROC difference [95% CI, paired subject bootstrap] |")
    print("|---|---|---:|")
    for r in runs:
        for a, b in (("probe", "random_init"), ("probe", "counts")):
            d = paired_delta(r / "predictions" / f"{a}.parquet", r / "predictions" / f"{b}.parquet")
            if d is not None:
                print(f"| {r.name} | {a} - {b} | {d[0]:+.3f} [{d[1]:+.3f}, {d[2]:+.3f}] |")


def paired_delta(pa_path: Path, pb_path: Path, n_boot: int = 1000) -> tuple[float, float, float] | None:
    """AUROC(a) - AUROC(b) on the same rows, CI from the same subject draws for both (same seed)."""
    if not (pa_path.is_file() and pb_path.is_file()):
        return None
    ta, tb = pq.read_table(pa_path), pq.read_table(pb_path)
    y = ta.column("boolean_value").to_numpy(zero_copy_only=False).astype(bool)
    sid = ta.column("subject_id").to_numpy()
    pa_ = ta.column("predicted_boolean_probability").to_numpy().astype(float)
    pb_ = tb.column("predicted_boolean_probability").to_numpy().astype(float)
    ba = bootstrap(y, pa_, sid, n_boot, 0)["auroc"]
    bb = bootstrap(y, pb_, sid, n_boot, 0)["auroc"]
    from sklearn.metrics import roc_auc_score

    diff = ba - bb
    diff = diff[np.isfinite(diff)]
    return (
        float(roc_auc_score(y, pa_) - roc_auc_score(y, pb_)),
        float(np.percentile(diff, 2.5)),
        float(np.percentile(diff, 97.5)),
    )


if __name__ == "__main__":
    main(Path(sys.argv[1] if len(sys.argv) > 1 else "runs/probe_gibleed/probe"))
