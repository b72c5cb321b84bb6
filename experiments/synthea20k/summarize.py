"""Markdown tables of the Synthea 20k study from its run dirs (see run_study.sh).

    python experiments/synthea20k/summarize.py [--study runs/synthea20k/study] [--n-boot 1000]

Tables: probe AUROC/AUPRC per method and readout; paired differences (probe minus the mean of the
random-init seeds, minus counts LR, minus counts HGB; both readouts, on the same subject-bootstrap
draws, `cehrx.eval.metrics.paired_difference`); the few-shot curves; zero-shot vs random init with both
estimators (Monte Carlo count and hazard sum) from the same futures.
The mean-readout runs skip the count baselines (`probe.baselines=[]`): they are paired with the
last-token run's count predictions, which score exactly the same labels (checked row by row).
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq

from cehrx.eval.metrics import format_metric, paired_difference

READOUTS = ("last", "mean")


def load(path: Path) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray] | None:
    """(labels, subjects, times, probabilities) of a predictions file, in (subject, time) order."""
    if not path.is_file():
        return None
    t = pq.read_table(path).sort_by([("subject_id", "ascending"), ("prediction_time", "ascending")])
    return (
        t.column("boolean_value").to_numpy(zero_copy_only=False).astype(bool),
        t.column("subject_id").to_numpy(),
        t.column("prediction_time").cast("int64").to_numpy(),
        t.column("predicted_boolean_probability").to_numpy().astype(float),
    )


def seeds(run: Path) -> list[Path]:
    return sorted(run.glob("predictions/random_init*.parquet"))


def tasks(study: Path) -> list[str]:
    return sorted({p.parent.name for r in READOUTS for p in (study / f"probe_{r}").glob("*/metrics.json")})


def probe_table(study: Path) -> None:
    print("### Probe: held-out AUROC / AUPRC [95% CI]\n")
    print(
        "| task | held-out labels (pos) / positive subjects | readout | probe | random init (mean of seeds) | counts LR | counts HGB |"
    )
    print("|---|---|---|---:|---:|---:|---:|")
    for task in tasks(study):
        for r in READOUTS:
            run = study / f"probe_{r}" / task
            if not (run / "metrics.json").is_file():
                continue
            m = json.loads((run / "metrics.json").read_text())
            sc = m["scored"]
            ri = m.get("random_init_seeds") or {}
            cell = {k: f"{format_metric(v['auroc'])} / {format_metric(v['auprc'])}" for k, v in m["methods"].items()}
            rand = (
                "-"
                if not ri
                else (
                    f"{ri['auroc_mean']:.3f} ± {ri['auroc_sd']:.3f}"
                    if len(ri["seeds"]) > 1
                    else f"{ri['auroc_mean']:.3f} (1 seed)"
                )
            )
            print(
                f"| {task} | {sc['labels']:,} ({sc['positives']:,}) / {sc['positive_subjects']} | {r} | {cell.get('probe', '-')} | {rand} | "
                f"{cell.get('counts', '-')} | {cell.get('counts_hgb', '-')} |"
            )
    print()


def paired_table(study: Path, n_boot: int) -> None:
    print("### Paired differences in held-out AUROC [95% CI] (same subject-bootstrap draws)\n")
    print("| task | readout | probe - random init (seeds beaten) | probe - counts LR | probe - counts HGB |")
    print("|---|---|---:|---:|---:|")
    for task in tasks(study):
        base = study / "probe_last" / task / "predictions"
        for r in READOUTS:
            run = study / f"probe_{r}" / task
            probe = load(run / "predictions" / "probe.parquet")
            if probe is None:
                continue
            y, sid, t, p = probe
            cells = []
            controls = [
                [load(f) for f in seeds(run)],
                [load(base / "counts.parquet")],
                [load(base / "counts_hgb.parquet")],
            ]
            for ctl in controls:
                ctl = [c for c in ctl if c is not None]
                if not ctl:
                    cells.append("-")
                    continue
                for c in ctl:
                    assert np.array_equal(c[1], sid) and np.array_equal(c[2], t) and np.array_equal(c[0], y), (
                        f"{task}: rows differ"
                    )
                d = paired_difference(y, sid, p, [c[3] for c in ctl], n_boot=n_boot)["auroc"]
                beats = f" ({d['beats']}/{len(ctl)})" if len(ctl) > 1 else ""
                cells.append(f"{d['value']:+.3f} [{d['ci_low']:+.3f}, {d['ci_high']:+.3f}]{beats}")
            print(f"| {task} | {r} | " + " | ".join(cells) + " |")
    print()


def few_shot_table(study: Path) -> None:
    print("### Few-shot: held-out AUROC by training labels k (mean ± sd over 3 draws)\n")
    rows = []
    for task in tasks(study):
        for r in READOUTS:
            f = study / f"probe_{r}" / task / "metrics.json"
            if f.is_file():
                for name, curve in json.loads(f.read_text()).get("few_shot", {}).items():
                    if r == "mean" and name == "counts":
                        continue
                    rows.append((task, f"{name} ({r})" if name != "counts" else name, curve))
    if not rows:
        return
    ks = list(dict.fromkeys(str(c["k"]) for _, _, curve in rows for c in curve))  # a k >= the training set is "all"
    print("| task | method | " + " | ".join(f"k={k}" for k in ks) + " |")
    print("|---|---|" + "---:|" * len(ks))
    for task, name, curve in rows:
        by_k = {str(c["k"]): f"{c['auroc']:.3f}" + (f" ± {c['auroc_sd']:.3f}" if c["auroc_sd"] else "") for c in curve}
        print(f"| {task} | {name} | " + " | ".join(by_k.get(k, "-") for k in ks) + " |")
    print()


def estimates(run: Path) -> dict[str, np.ndarray]:
    """A zero-shot run's per-label inputs and both estimators (as the task finalises them), in (subject, time) order."""
    t = pq.read_table(run / "details.parquet").sort_by([("subject_id", "ascending"), ("prediction_time", "ascending")])
    col = lambda c: t.column(c).to_numpy(zero_copy_only=False)
    res = col("n_resolved")
    out = {
        "y": col("boolean_value").astype(bool),
        "sid": col("subject_id"),
        "time": t.column("prediction_time").cast("int64").to_numpy(),
        "w": col("weight") if "weight" in t.column_names else None,
    }
    for name, num in (("mc", "n_outcome"), ("hazard", "hazard_sum")):
        if num in t.column_names:
            x = col(num).astype(float)
            rate = float(np.nansum(x) / res.sum()) if res.sum() else 0.0
            out[name] = np.where(res > 0, x / np.maximum(res, 1), rate)
    return out


def zeroshot_table(study: Path, n_boot: int) -> None:
    runs = sorted((study / "zeroshot").glob("*/metrics.json"))
    if not runs:
        return
    print("### Zero-shot: held-out AUROC / Brier / ECE, model vs random init, both estimators from the same futures\n")
    print(
        "| task | labels (pos) | estimator | model AUROC | random init AUROC | model - random [95% CI] | model Brier | model ECE | mean label SE |"
    )
    print("|---|---:|---|---:|---:|---:|---:|---:|---:|")
    for f in runs:
        task = f.parent.name
        m = json.loads(f.read_text())
        rnd = study / "zeroshot_random_init" / task
        a = estimates(f.parent)
        b = estimates(rnd) if (rnd / "metrics.json").is_file() else None
        mr = json.loads((rnd / "metrics.json").read_text()) if b is not None else {}
        n = f"{a['y'].size:,} ({int(a['y'].sum()):,})"
        for e in ("mc", "hazard"):
            if e not in a:
                continue
            me = m.get("estimators", {}).get(e, m)
            diff, rand_auc = "-", "-"
            if b is not None and e in b and np.array_equal(a["sid"], b["sid"]) and np.array_equal(a["time"], b["time"]):
                d = paired_difference(a["y"], a["sid"], a[e], [b[e]], n_boot=n_boot, sample_weight=a["w"])["auroc"]
                diff = f"{d['value']:+.3f} [{d['ci_low']:+.3f}, {d['ci_high']:+.3f}]"
                rand_auc = format_metric(mr.get("estimators", {}).get(e, mr)["auroc"])
            se = me.get("mean_label_se")
            print(
                f"| {task} | {n} | {e} | {format_metric(me['auroc'])} | {rand_auc} | {diff} | {format_metric(me['brier'])} | "
                f"{format_metric(me['ece'])} | {'-' if se is None else f'{se:.4f}'} |"
            )
    print()


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--study", type=Path, default=Path("runs/synthea20k/study"))
    ap.add_argument("--n-boot", type=int, default=1000)
    ap.add_argument("--only", choices=["probe", "zeroshot"], default=None, help="one part of the study")
    args = ap.parse_args()
    if args.only in (None, "probe"):
        probe_table(args.study)
        paired_table(args.study, args.n_boot)
        few_shot_table(args.study)
    if args.only in (None, "zeroshot"):
        zeroshot_table(args.study, args.n_boot)


if __name__ == "__main__":
    main()
