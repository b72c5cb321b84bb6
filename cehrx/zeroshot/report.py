"""The zero-shot report's parts: both estimators side by side, per-label details, the futures summary, sections."""

from __future__ import annotations

import math
from typing import Any

import numpy as np
import pyarrow as pa

from cehrx.data.history import NO_HISTORY
from cehrx.eval.metrics import format_ci
from cehrx.zeroshot.outcome import Outcome
from cehrx.zeroshot.predict import LabelInputs
from cehrx.zeroshot.reach import REACH_NOTE

__all__ = ["compare_estimators", "details", "futures_summary", "reach_summary", "report_sections"]


def compare_estimators(
    estimates: dict[str, tuple],
    kept: pa.Table,
    y: np.ndarray,
    sid: np.ndarray,
    w: np.ndarray | None,
    n_boot: int,
    seed: int,
) -> dict[str, Any]:
    """Both estimators' metrics on the same labels, and hazard minus Monte Carlo on the same bootstrap draws.

    Also the mean per-label standard error of each: the Monte Carlo one is that of a binomial share
    of the resolved futures, the hazard one the spread of its per-future sums (`cehrx.zeroshot.predict`)."""
    from cehrx.eval.metrics import binary_metrics, paired_difference

    out: dict[str, Any] = {
        e: binary_metrics(y, p, sid, n_boot=n_boot, seed=seed, sample_weight=w) for e, (p, _, _) in estimates.items()
    }
    res = np.maximum(kept.column("n_resolved").to_numpy(), 1)
    p_mc = estimates["mc"][0]
    out["mc"]["mean_label_se"] = float(np.mean(np.sqrt(p_mc * (1 - p_mc) / res)))
    se = kept.column("hazard_se").to_numpy(zero_copy_only=False)  # NaN for labels with fewer than 2 resolved futures
    out["hazard"]["mean_label_se"] = float(np.nanmean(se)) if np.isfinite(se).any() else float("nan")
    unclipped = kept.column("hazard_sum").to_numpy(zero_copy_only=False) / res
    out["hazard"]["labels_clipped"] = int(np.sum(unclipped > 1))  # reported as 1 (cehrx.zeroshot.score)
    out["hazard - mc"] = paired_difference(y, sid, estimates["hazard"][0], [p_mc], n_boot, seed, sample_weight=w)
    if "hazard_cv" in estimates:  # the hazard sum with control variates, same futures
        out["hazard_cv"]["mean_label_se"] = float(
            np.nanmean(kept.column("hazard_cv_se").to_numpy(zero_copy_only=False))
        )
        out["hazard_cv - hazard"] = paired_difference(
            y, sid, estimates["hazard_cv"][0], [estimates["hazard"][0]], n_boot, seed, sample_weight=w
        )
    return out


def reach_summary(kept: pa.Table) -> dict[str, Any]:
    """metrics.json `reach` of a REACH run: its mean per-label standard error, and why no other estimator is beside it."""
    se = kept.column("reach_se").to_numpy(zero_copy_only=False)
    return {"mean_label_se": float(np.nanmean(se)) if np.isfinite(se).any() else None, "note": REACH_NOTE}


def details(kept: pa.Table, labels: LabelInputs, lr: np.ndarray, prob: np.ndarray, fallback: np.ndarray) -> pa.Table:
    cols = {
        "subject_id": pa.array(labels.subject_id[lr]),
        "prediction_time": pa.array(labels.prediction_time[lr].astype("datetime64[s]").astype("datetime64[us]")),
        "boolean_value": pa.array(labels.boolean_value[lr]),
        "probability": pa.array(prob),
        "fallback": pa.array(fallback),
    }
    if labels.weight is not None:
        cols["weight"] = pa.array(labels.weight[lr])
    for c in kept.column_names:  # the control variates' sums stay in chunks/ (K x K numbers a label)
        if c not in ("label_row", "has_history", "probability") and not c.startswith("cv_"):
            cols[c] = kept.column(c)
    return pa.table(cols)


def futures_summary(kept: pa.Table, fallback: np.ndarray, rate: float, n_dropped: int) -> dict[str, Any]:
    """The futures of the run. A REACH run's futures never have the outcome inside the window (it is forbidden
    there): no `with_outcome_share`, and the expected days to the outcome are REACH's."""
    col = {c: kept.column(c).to_numpy(zero_copy_only=False) for c in kept.column_names}
    n_fut = int(col["n_futures"].sum())
    days = col.get("expected_days", col.get("reach_expected_days"))
    days = days[np.isfinite(days)]
    with_outcome = {}
    if "n_outcome" in col:
        with_outcome["with_outcome_share"] = round(float(col["n_outcome"].sum() / max(n_fut, 1)), 4)
    return {
        "futures": n_fut,
        "resolved_share": round(float(col["n_resolved"].sum() / max(n_fut, 1)), 4),
        **with_outcome,
        "stops": {k[len("stop_") :]: int(v.sum()) for k, v in col.items() if k.startswith("stop_")},
        "labels_all_unresolved": int(fallback.sum()),
        "fallback_probability": rate,
        "median_expected_days_to_outcome": float(np.median(days)) if len(days) else math.nan,
        "mean_history_tokens": round(float(col["history_len"].mean()), 1) if len(kept) else math.nan,
        "labels_without_history": int(n_dropped),
        "dropped_reason": NO_HISTORY,
    }


def report_sections(
    outcome: Outcome, s: dict[str, Any], facts: dict[str, Any], estimators: dict[str, Any] | None = None
) -> dict[str, str]:
    w = outcome.window
    end = "unbounded" if math.isinf(w.end_days) else f"{w.end_days:g} days"
    win = f"{'[' if w.start_inclusive else '('}{w.start_days:g} days, {end}{']' if w.end_inclusive else ')'} after the prediction time"
    if w.visits:
        win += f", within the next {w.visits} visit(s)"
    return {
        "Outcome": f"- codes: {', '.join(outcome.codes)} ({len(outcome.token_ids)} token(s); descendants: {outcome.descendants})\n"
        f"- window: {win}\n- unmatched codes: {', '.join(outcome.unmatched) or 'none'}",
        "Futures": (
            f"- {s['futures']} futures; resolved {s['resolved_share']:.1%}"
            + (
                f"; with the outcome {s['with_outcome_share']:.1%}\n"
                if "with_outcome_share" in s
                else " (REACH: the outcome forbidden inside the window)\n"
            )
            + f"- stops: {', '.join(f'{k} {v}' for k, v in s['stops'].items())}\n"
            f"- labels whose futures were all unresolved (given the cohort rate {s['fallback_probability']:.3f}): {s['labels_all_unresolved']}\n"
            f"- labels without a history before the prediction time (dropped): {s['labels_without_history']}\n"
            f"- median expected days to the outcome: {s['median_expected_days_to_outcome']:.0f}"
        ),
        **({"Estimators": _estimator_lines(estimators)} if estimators else {}),
        "Run": "\n".join(f"- {k}: {v}" for k, v in facts.items()),
    }


def _estimator_lines(e: dict[str, Any]) -> str:
    """Monte Carlo count vs hazard sum on the same futures (see cehrx.zeroshot.score), or a REACH run's note."""
    if "note" in e:  # metrics.json `reach`
        se = "n/a" if e["mean_label_se"] is None else f"{e['mean_label_se']:.4f}"
        return f"- reach: mean per-label SE {se}\n- {e['note']}"
    lines = ["| estimator | AUROC (95 % CI) | AUPRC | Brier | mean per-label SE |", "|---|---|---|---|---|"]
    for name in [n for n in ("mc", "hazard", "hazard_cv") if n in e]:
        m = e[name]
        lines.append(
            f"| {name} | {format_ci(m['auroc'])} | "
            f"{m['auprc']['value']:.3f} | {m['brier']['value']:.4f} | {m['mean_label_se']:.4f} |"
        )
    d = e["hazard - mc"]["auroc"]
    lines.append(f"\nhazard - mc AUROC: {format_ci(d, signed=True)} (paired bootstrap)")
    if "hazard_cv - hazard" in e:
        d = e["hazard_cv - hazard"]["auroc"]
        lines.append(f"hazard_cv - hazard AUROC: {format_ci(d, signed=True)} (paired bootstrap)")
    if e["hazard"].get("labels_clipped"):
        lines.append(f"hazard: {e['hazard']['labels_clipped']} labels' mean sum above 1, reported as 1")
    return "\n".join(lines)
