"""Zero-shot estimators side by side: Monte Carlo count vs hazard sum, on the same sampled futures.

    python experiments/zeroshot/bench_estimators.py --model runs/synthea20k/model --task synthea20k_death_1y \\
        --out runs/zeroshot_estimators/death_1y --seeds 10 --futures 10 --max-labels 400 \\
        -- zeroshot.history_len=512 sampling.max_new_tokens=512

Runs `cehrx task=zeroshot` `--seeds` times with `--futures` futures each, the labels fixed
(`zeroshot.label_seed`) and only the futures' seed changing (`sampling.seed`). Every run scores both
estimators from the same futures. Then, on the same labels (issue 24's bar):

- Monte Carlo with all `seeds x futures` futures (the resolved counts pooled over the runs) against
  the hazard estimator with `futures` futures (each run; mean and spread over runs) and Monte Carlo
  with `futures` futures: AUROC, Brier (weighted back to the split for case-control samples);
- the per-label spread over the first 5 runs, hazard vs Monte Carlo at equal futures;
- wall time per label of one run (both estimators cost the same run; Monte Carlo at `seeds x futures`
  costs `seeds` runs).

Writes `<out>/estimators.json` and prints a Markdown table. Finished runs are reused.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq

from cehrx.eval.metrics import binary_metrics


def run_seed(args: argparse.Namespace, k: int, estimator: str | None = None) -> Path:
    """Run k of `futures` futures; `estimator=reach` samples its own futures (the outcome forbidden in
    the window), so its runs live beside the natural ones (`reach_seed_<k>`) with the same labels."""
    out = args.out / ({"hazard_cv": "cv_seed", "reach": "reach_seed"}.get(estimator, "seed") + f"_{k}")
    if not (out / "metrics.json").is_file():
        cmd = [
            sys.executable,
            "-m",
            "cehrx",
            "task=zeroshot",
            f"model_dir={args.model}",
            f"probe.task={args.task}",
            f"zeroshot.num_samples={args.futures}",
            f"sampling.seed={args.seed + k}",
            f"zeroshot.label_seed={args.seed}",
            f"zeroshot.max_labels={args.max_labels}",
            f"zeroshot.label_sample={args.label_sample}",
            "zeroshot.progress=false",
            f"output_dir={out}",
            *([f"zeroshot.estimator={estimator}"] if estimator else []),
            *args.overrides,
        ]
        print(
            f"[{time.strftime('%H:%M:%S')} load {os.getloadavg()[0]:.2f}] {' '.join(cmd[2:])}",
            file=sys.stderr,
            flush=True,
        )
        subprocess.run(cmd, check=True)
    return out


def load(out: Path, estimator: str = "natural") -> dict[str, np.ndarray]:
    t = pq.read_table(out / "details.parquet")
    keys = ["subject_id", "prediction_time", "boolean_value", "n_resolved"]
    more = ["reach_sum"] if estimator == "reach" else ["n_outcome", "hazard_sum", "hazard_probability", "probability"]
    if estimator == "hazard_cv":
        more.append("hazard_cv_sum")
    d = {c: t.column(c).to_numpy(zero_copy_only=False) for c in keys + more}
    d["prediction_time"] = d["prediction_time"].astype("datetime64[us]").astype(np.int64)
    d["weight"] = t.column("weight").to_numpy() if "weight" in t.column_names else None
    d["seconds"] = json.loads((out / "metrics.json").read_text())["run"]["seconds"]
    return d


def with_fallback(num: np.ndarray, res: np.ndarray) -> np.ndarray:
    """num / res per label; labels without a resolved future get the run's pooled rate (as the task does)."""
    rate = float(np.nansum(num) / res.sum()) if res.sum() else 0.0
    return np.where(res > 0, num / np.maximum(res, 1), rate)


def mc_pooled(runs: list[dict]) -> list[np.ndarray]:
    """Monte Carlo with the first m runs' futures pooled (m * futures per label), m = 1..len(runs): how many
    futures the count needs to reach the hazard estimator's quality (equal-quality cost, issue 24). The last
    entry pools every run."""
    res = np.cumsum([r["n_resolved"] for r in runs], axis=0)
    hits = np.cumsum([r["n_outcome"] for r in runs], axis=0).astype(float)
    return [with_fallback(h, n) for h, n in zip(hits, res)]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", required=True)
    ap.add_argument("--task", required=True)
    ap.add_argument("--out", type=Path, required=True)
    ap.add_argument("--seeds", type=int, default=10)
    ap.add_argument("--futures", type=int, default=10)
    ap.add_argument("--max-labels", type=int, default=400)
    ap.add_argument("--label-sample", default="case_control")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--n-boot", type=int, default=500)
    ap.add_argument("--reach-seeds", type=int, default=0, help="also this many REACH runs (own futures, same labels)")
    ap.add_argument(
        "--controls",
        action="store_true",
        help="the natural runs as zeroshot.estimator=hazard_cv (cv_seed_<k>: the same futures, plus the hazard sum "
        "with control variates)",
    )
    ap.add_argument("overrides", nargs="*", help="more cehrx overrides, after --")
    args = ap.parse_args()
    natural = "hazard_cv" if args.controls else None
    runs = [load(run_seed(args, k, natural), natural or "natural") for k in range(args.seeds)]
    reach = [load(run_seed(args, k, "reach"), "reach") for k in range(args.reach_seeds)]
    base = runs[0]
    for r in runs[1:] + reach:
        if not (
            np.array_equal(r["subject_id"], base["subject_id"])
            and np.array_equal(r["prediction_time"], base["prediction_time"])
        ):
            raise SystemExit("the runs hold different labels: they must share zeroshot.label_seed and the task")
    y, sid, w = base["boolean_value"].astype(bool), base["subject_id"], base["weight"]

    def metrics(p: np.ndarray) -> dict:
        m = binary_metrics(y, p, sid, n_boot=args.n_boot, seed=0, sample_weight=w)
        return {k: m[k] for k in ("auroc", "auprc", "brier")}

    pooled = [{"runs": m + 1, **metrics(p)} for m, p in enumerate(mc_pooled(runs))]
    mc_k = [with_fallback(r["n_outcome"].astype(float), r["n_resolved"]) for r in runs]
    hz_k = [with_fallback(r["hazard_sum"], r["n_resolved"]) for r in runs]
    cv_k = [with_fallback(r["hazard_cv_sum"], r["n_resolved"]) for r in runs] if args.controls else []
    n5 = min(5, len(runs))
    spread = {
        name: float(np.mean(np.var(np.stack(ps[:n5]), axis=0, ddof=1)))
        for name, ps in (("mc", mc_k), ("hazard", hz_k), ("hazard_cv", cv_k))
        if ps
    }
    result = {
        "task": args.task,
        "model": str(args.model),
        "labels": int(len(y)),
        "positives": int(y.sum()),
        "runs": len(runs),
        "futures_per_run": args.futures,
        f"mc_{args.seeds * args.futures}": {k: v for k, v in pooled[-1].items() if k != "runs"},
        f"mc_{args.futures}": [metrics(p) for p in mc_k],
        f"hazard_{args.futures}": [metrics(p) for p in hz_k],
        f"per_label_variance_over_{n5}_runs": spread,
        "variance_ratio_mc_over_hazard": spread["mc"] / spread["hazard"] if spread["hazard"] > 0 else float("inf"),
        # the share of Monte Carlo's per-label variance that is the outcome's draw, not the path (the hazard
        # sum removes only the draw): the paper's "spontaneity"; hazard@10 can match MC@100 only above ~0.9
        "draw_share_of_variance": 1.0 - spread["hazard"] / spread["mc"] if spread["mc"] > 0 else float("nan"),
        "seconds_per_label_one_run": float(np.mean([r["seconds"] for r in runs]) / len(y)),
        "seconds_per_label_one_run_min": float(np.min([r["seconds"] for r in runs]) / len(y)),
        "mc_pooled": pooled,
    }
    if cv_k:
        result[f"hazard_cv_{args.futures}"] = [metrics(p) for p in cv_k]
        result["variance_ratio_mc_over_hazard_cv"] = spread["mc"] / spread["hazard_cv"] if spread["hazard_cv"] else None
    if reach:
        rc_k = [with_fallback(r["reach_sum"], r["n_resolved"]) for r in reach]
        var_r = float(np.mean(np.var(np.stack(rc_k[: min(5, len(rc_k))]), axis=0, ddof=1))) if len(rc_k) > 1 else None
        result[f"reach_{args.futures}"] = [metrics(p) for p in rc_k]
        result["reach_per_label_variance"] = var_r
        result["variance_ratio_mc_over_reach"] = spread["mc"] / var_r if var_r else None
        result["reach_seconds_per_label_one_run"] = float(np.mean([r["seconds"] for r in reach]) / len(y))
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "estimators.json").write_text(json.dumps(result, indent=2) + "\n")
    print(table(result, args))


def table(r: dict, args: argparse.Namespace) -> str:
    f, big = args.futures, args.seeds * args.futures
    var = next(v for k, v in r.items() if k.startswith("per_label_variance"))

    def row(name: str, ms: list[dict], futures: int, secs: float | None = None) -> str:
        a = np.array([m["auroc"]["value"] for m in ms])
        b = np.array([m["brier"]["value"] for m in ms])
        ci = ms[0]["auroc"]
        spread = f" (sd {a.std(ddof=1):.3f} over {len(ms)} runs)" if len(ms) > 1 else ""
        return (
            f"| {name} | {futures} | {a.mean():.3f}{spread} | [{ci['ci_low']:.3f}, {ci['ci_high']:.3f}] | {b.mean():.4f} | "
            f"{(secs or r['seconds_per_label_one_run']) * futures / f:.3f} |"
        )

    lines = [
        f"{r['task']}: {r['labels']} labels ({r['positives']} positive), {r['runs']} runs of {f} futures",
        "",
        "| estimator | futures per label | AUROC | 95 % CI (first run) | Brier | s per label |",
        "|---|---:|---|---|---:|---:|",
        row("Monte Carlo", [r[f"mc_{big}"]], big),
        row("Monte Carlo", r[f"mc_{f}"], f),
        row("hazard", r[f"hazard_{f}"], f),
        *([row("hazard + control variates", r[f"hazard_cv_{f}"], f)] if f"hazard_cv_{f}" in r else []),
        *(
            [row("REACH (own futures)", r[f"reach_{f}"], f, r["reach_seconds_per_label_one_run"])]
            if f"reach_{f}" in r
            else []
        ),
        "",
        f"per-label variance over runs at {f} futures: Monte Carlo {var['mc']:.2e}, hazard {var['hazard']:.2e} "
        f"(ratio {r['variance_ratio_mc_over_hazard']:.1f}x; "
        f"the draw's share of Monte Carlo's variance {1 - var['hazard'] / var['mc']:.1%})",
        *(
            [
                f"hazard + control variates: per-label variance {var['hazard_cv']:.2e} (Monte Carlo / it "
                f"{r['variance_ratio_mc_over_hazard_cv']:.1f}x)"
            ]
            if "hazard_cv" in var
            else []
        ),
        "",
        "Monte Carlo with m runs pooled (AUROC / Brier): "
        + ", ".join(
            f"{p['runs'] * f}: {p['auroc']['value']:.3f} / {p['brier']['value']:.4f}" for p in r.get("mc_pooled", [])
        ),
        *(
            [
                f"REACH: per-label variance {r['reach_per_label_variance']:.2e} (Monte Carlo / REACH "
                f"{r['variance_ratio_mc_over_reach']:.1f}x), {r['reach_seconds_per_label_one_run']:.3f} s per label per run"
            ]
            if r.get("reach_per_label_variance")
            else []
        ),
        f"wall time of one run (s per label): mean {r['seconds_per_label_one_run']:.3f}, "
        f"min {r.get('seconds_per_label_one_run_min', float('nan')):.3f}",
    ]
    return "\n".join(lines)


if __name__ == "__main__":
    main()
