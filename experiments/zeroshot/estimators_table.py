"""Issue 24's bar on every benchmarked task, one row each, from `bench_estimators.py`'s outputs.

    python experiments/zeroshot/estimators_table.py [runs/zeroshot_estimators]

Reads `<root>/<task>/estimators.json` and prints a Markdown table: AUROC and Brier of the hazard sum with
the per-run futures (mean over runs) against Monte Carlo with all runs pooled, the per-label variance
ratio at equal futures, the draw's share of Monte Carlo's variance (what the hazard sum can remove), and
the three verdicts for the hazard sum (AUROC >=, Brier <, variance >= 5x), the wall time at equal quality
(how many runs Monte Carlo pools before its AUROC, or its Brier, reaches the hazard sum's with one run's futures: every run
costs the same, and the hazard sum reads the same futures, so that is the time ratio), and REACH's numbers where
the benchmark ran it (`--reach-seeds`), and the hazard sum with control variates' (`--controls`) with
its own three verdicts.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import numpy as np


def time_at_equal(r: dict, metric: str, hazard_value: float) -> str:
    """Monte Carlo's runs (its cost, in hazard runs) to reach the hazard sum's `metric` (auroc: at least it;
    brier: at most it) at one run's futures; "> runs x" when all runs pooled do not."""
    if not r.get("mc_pooled"):
        return "-"
    for pooled in r["mc_pooled"]:
        v = pooled[metric]["value"]
        if (v >= hazard_value) if metric == "auroc" else (v <= hazard_value):
            return f"{pooled['runs']}x"
    return f"> {r['runs']}x"


def row(r: dict) -> str:
    f, big = r["futures_per_run"], r["runs"] * r["futures_per_run"]
    hz = r[f"hazard_{f}"]
    auc_h = float(np.mean([m["auroc"]["value"] for m in hz]))
    brier_h = float(np.mean([m["brier"]["value"] for m in hz]))
    mc = r[f"mc_{big}"]
    auc_m, brier_m = mc["auroc"]["value"], mc["brier"]["value"]
    var = next(v for k, v in r.items() if k.startswith("per_label_variance"))
    ratio = r["variance_ratio_mc_over_hazard"]
    share = 1 - var["hazard"] / var["mc"]
    ok = lambda b: "met" if b else "not met"  # noqa: E731
    rc = r.get(f"reach_{f}")
    reach = "-"
    if rc:
        auc_r = float(np.mean([m["auroc"]["value"] for m in rc]))
        brier_r = float(np.mean([m["brier"]["value"] for m in rc]))
        ratio_r = r.get("variance_ratio_mc_over_reach") or float("nan")
        reach = f"{auc_r:.3f} / {brier_r:.4f} / {ratio_r:.1f}x"
    cv, cvs = r.get(f"hazard_cv_{f}"), "-"
    if cv:
        auc_c = float(np.mean([m["auroc"]["value"] for m in cv]))
        brier_c = float(np.mean([m["brier"]["value"] for m in cv]))
        ratio_c = r.get("variance_ratio_mc_over_hazard_cv") or float("nan")
        verdicts = "/".join(ok(b) for b in (auc_c >= auc_m, brier_c < brier_m, ratio_c >= 5))
        cvs = f"{auc_c:.3f} / {brier_c:.4f} / {ratio_c:.1f}x ({verdicts})"
    return (
        f"| {r['task']} | {r['labels']} ({r['positives']}) | {auc_h:.3f} | {auc_m:.3f} | {brier_h:.4f} | {brier_m:.4f} "
        f"| {ratio:.1f}x | {share:.1%} | {ok(auc_h >= auc_m)} | {ok(brier_h < brier_m)} | {ok(ratio >= 5)} "
        f"| {time_at_equal(r, 'auroc', auc_h)} / {time_at_equal(r, 'brier', brier_h)} "
        f"| {reach} | {cvs} |"
    )


def main(root: Path) -> None:
    results = [json.loads(p.read_text()) for p in sorted(root.glob("*/estimators.json"))]
    if not results:
        raise SystemExit(f"no */estimators.json under {root}: run experiments/zeroshot/run_bench_estimators.sh first")
    f = results[0]["futures_per_run"]
    big = results[0]["runs"] * f
    print(
        f"| task | labels (positive) | AUROC hazard@{f} | AUROC MC@{big} | Brier hazard@{f} | Brier MC@{big} "
        f"| variance MC/hazard @{f} | draw share | AUROC | Brier | variance | MC time to hazard's AUROC / Brier "
        f"| REACH@{f} AUROC / Brier / variance MC/REACH "
        f"| hazard+CV@{f} AUROC / Brier / variance MC/it (verdicts) |"
    )
    print("|---|---:|---:|---:|---:|---:|---:|---:|---|---|---|---:|---|---|")
    for r in results:
        print(row(r))


if __name__ == "__main__":
    main(Path(sys.argv[1] if len(sys.argv) > 1 else "runs/zeroshot_estimators"))
