"""`cehrx task=zeroshot`: outcome probabilities from sampled future trajectories, no task training.

    cehrx task=zeroshot model_dir=runs/mysite/model probe.task=gibleed_after_nsaid \\
          zeroshot.num_samples=20 output_dir=runs/mysite/zeroshot

The task (`probe.task`, an ACES config under `configs/aces/`) gives both the labels (extracted
from the prepared dir's MEDS data, or read from `labels_dir=...`) and the outcome (codes and
window, `cehrx.zeroshot.outcome`). Predictions are for the subjects of `split` (default
`held_out`, the split `probe` scores on, so both can be compared; `split=all` for every label).

Output (`output_dir`; the finished dir appears at once, `metrics.json` marks it finished):

    predictions.parquet   meds-evaluation schema (label + predicted probability of `zeroshot.estimator`)
    details.parquet       per label: futures sampled / resolved / with the outcome, expected days
                          to the outcome, fallback flag, history length, stop reasons; the hazard
                          estimate, its standard error, expected days and cumulative incidence curve
    metrics.json          AUROC, AUPRC, Brier, ECE with subject-level bootstrap CIs + run facts; with
                          both estimators (`estimators`: mc and hazard, and their paired difference)
    report.md, roc.png    the report format `probe` writes
    trajectories/<j>.parquet   sample j of every label as MEDS rows (zeroshot.write_trajectories)
    chunks/               per-chunk results: an interrupted run resumes from them
    config.yaml           the resolved config
"""

from __future__ import annotations

import logging
import math
import os
import shutil
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq
from omegaconf import DictConfig, OmegaConf

from cehrx.data.history import NO_HISTORY, load_all_splits
from cehrx.data.shards import SPLITS
from cehrx.data.vocab import Vocab
from cehrx.errors import CehrxError
from cehrx.tasks.inputs import prepared_dir_for
from cehrx.tasks.scaffold import guard, task_output, write_marker
from cehrx.zeroshot.outcome import Outcome, resolve_outcome
from cehrx.zeroshot.predict import (
    CHUNK_DIR,
    ESTIMATORS,
    LabelInputs,
    ZeroshotConfig,
    config_dict,
    finalize_probabilities,
    fingerprint,
    prepare_work_dir,
    run_chunks,
    write_trajectories,
)

log = logging.getLogger("cehrx.zeroshot")


def run(cfg: DictConfig) -> dict[str, Any]:
    """Labels -> histories -> sampled futures -> probabilities -> predictions, metrics, report."""
    out = Path(cfg.output_dir)
    guard("zeroshot", out, bool(cfg.overwrite))
    zc = cfg.zeroshot
    zcfg = ZeroshotConfig.from_mapping(OmegaConf.to_container(zc, resolve=True))
    task = OmegaConf.select(cfg, "probe.task")
    from cehrx.model.export import (
        load_pretrained,
        model_dir,
        random_init_like,
        resolve_device,
    )

    device = resolve_device(str(zc.get("device", "auto")), "zeroshot.device")
    model, vocab = load_pretrained(cfg.model_dir, map_location=device)
    random_init = bool(zc.get("random_init", False))
    if random_init:
        model = random_init_like(model, zcfg.seed)
    prepared = prepared_dir_for(cfg, cfg.model_dir)
    check_vocab(vocab, prepared)
    outcome = resolve_outcome(
        vocab,
        task,
        _list(zc.get("outcome_codes")),
        _float(zc.get("window_days")),
        _int(zc.get("window_visits")),
        prepared,
        bool(zc.get("include_descendants", True)),
    )
    arrays, split_of = load_all_splits(prepared)
    from cehrx.probe.labels import read_labels

    all_labels, label_source = read_labels(cfg, prepared)
    split = str(cfg.get("split") or "held_out")
    table = select_split(all_labels, arrays.subject_id, split_of, split)
    table, weight, sample_info = sample_labels(
        table,
        _int(zc.get("max_labels")),
        str(zc.get("label_sample") or "uniform"),
        int(zc.get("label_seed", zcfg.seed)),
    )
    labels = labels_from(table, weight)
    fp = fingerprint(
        {
            "model": str(model_dir(cfg.model_dir).resolve()),
            "model_mtime": _mtime(model_dir(cfg.model_dir)),
            "outcome": outcome.describe(vocab),
            "prepared": str(prepared.resolve()),
            "random_init": random_init,
            "split": split,
            "zeroshot": {k: v for k, v in config_dict(zcfg).items() if k != "estimator"},
        },
        labels,
    )  # the chunks hold both estimators
    resumed = prepare_work_dir(out, fp, bool(cfg.overwrite))
    if resumed:
        print(f"zeroshot: resuming, {resumed} chunk(s) already done in {out / CHUNK_DIR}", file=sys.stderr)
    start = time.perf_counter()
    results = run_chunks(model, vocab, arrays, labels, outcome, zcfg, out, progress=bool(zc.get("progress", True)))
    seconds = time.perf_counter() - start
    recal = None
    if bool(zc.get("recalibrate", False)):
        recal = recalibration(cfg, model, vocab, arrays, split_of, all_labels, outcome, zcfg, out, fp)
    facts = {
        "task": task,
        "label_source": label_source,
        "split": split,
        "prepared_dir": str(prepared),
        "model_dir": str(cfg.model_dir),
        "random_init": random_init,
        "device": str(device),
        "seconds": round(seconds, 1),
        "resumed_chunks": resumed,
        "label_sample": sample_info,
    }
    return finish(cfg, out, vocab, outcome, labels, results, zcfg, facts, recal)


RECAL_DIR = "recalibration"


def recalibration(
    cfg: DictConfig,
    model: Any,
    vocab: Vocab,
    arrays: Any,
    split_of: np.ndarray,
    table: pa.Table,
    outcome: Outcome,
    zcfg: ZeroshotConfig,
    out: Path,
    fp: str,
) -> dict[str, Any]:
    """Platt scaling of the chosen estimator, fitted on zero-shot predictions for the tuning split's labels
    (sampled as the test labels are, in `<output_dir>/recalibration/chunks`, resumable): on the logit of
    the raw probability, a weighted logistic regression gives `sigmoid(a * logit(p) + b)`. The model's
    own probabilities stay in `details.parquet` (`probability_uncalibrated`)."""
    from sklearn.linear_model import LogisticRegression

    zc = cfg.zeroshot
    tune = select_split(table, arrays.subject_id, split_of, "tuning")
    tune, weight, info = sample_labels(
        tune, _int(zc.get("max_labels")), str(zc.get("label_sample") or "uniform"), int(zc.get("label_seed", zcfg.seed))
    )
    labels = labels_from(tune, weight)
    work = out / RECAL_DIR
    prepare_work_dir(work, fingerprint({"test_run": fp, "split": "tuning"}, labels), bool(cfg.overwrite))
    res = run_chunks(model, vocab, arrays, labels, outcome, zcfg, work, progress=bool(zc.get("progress", True)))
    ok = res.column("has_history").to_numpy(zero_copy_only=False).astype(bool)
    rows = res.column("label_row").to_numpy()[ok]
    p = finalize_probabilities(res.filter(pa.array(ok)), zcfg.estimator)[0]
    y = labels.boolean_value[rows]
    if y.all() or not y.any():
        raise CehrxError(
            f"zeroshot.recalibrate: the tuning split's {len(y)} sampled labels hold one class only; nothing to fit"
        )
    w = None if labels.weight is None else labels.weight[rows]
    lr = LogisticRegression(C=1e6).fit(_logit(p)[:, None], y, sample_weight=w)
    return {
        "method": "platt on the tuning split",
        "a": float(lr.coef_[0, 0]),
        "b": float(lr.intercept_[0]),
        "n": int(len(y)),
        "n_pos": int(y.sum()),
        "label_sample": info,
    }


def recalibrate(p: np.ndarray, recal: dict[str, Any]) -> np.ndarray:
    return 1.0 / (1.0 + np.exp(-(recal["a"] * _logit(p) + recal["b"])))


def _logit(p: np.ndarray) -> np.ndarray:
    q = np.clip(np.asarray(p, dtype=np.float64), 1e-6, 1 - 1e-6)
    return np.log(q / (1 - q))


# ------------------------------------------------------------------------------------- inputs


def check_vocab(vocab: Vocab, prepared: Path) -> None:
    """The model must read the prepared tokens with the vocabulary it was trained on."""
    data = Vocab.load(prepared)
    if data.tokens != vocab.tokens:
        raise CehrxError(
            f"{prepared}/vocab.json differs from the model's vocab.json ({len(data)} vs {len(vocab)} tokens): "
            "zero-shot needs the prepared dir the model was trained on (or one prepared with its vocabulary)"
        )


def select_split(table: pa.Table, subject_ids: np.ndarray, split_of: np.ndarray, split: str) -> pa.Table:
    """Labels of subjects in `split` (`all`: every label)."""
    if split != "all":
        if split not in SPLITS:
            raise CehrxError(f"split={split!r}: choose one of {', '.join(SPLITS)} or all")
        keep = pa.array(np.asarray(subject_ids)[np.asarray(split_of) == split])
        table = table.filter(pc.is_in(table.column("subject_id"), value_set=keep))
    if not len(table):
        raise CehrxError(f"no labels for split {split!r} (subjects of the prepared dir's {split} split)")
    return table


LABEL_SAMPLES = ("uniform", "case_control")


def sample_labels(
    table: pa.Table, max_labels: int | None, how: str, seed: int
) -> tuple[pa.Table, np.ndarray | None, dict]:
    """At most `max_labels` labels (seeded), and each kept label's weight (None: unweighted).

    `uniform` keeps a simple random sample. `case_control` keeps the positive labels (up to half of
    `max_labels`) and fills the rest with negatives: for a rare outcome (0.6 % of the labels) a
    uniform sample of 2,000 holds ~12 positives, this one every positive. Each label then weighs
    1 / its sampling probability (class count / class sample size), and the metrics are computed
    with those weights, so AUROC, AUPRC, Brier and ECE estimate those of all the split's labels.
    """
    if how not in LABEL_SAMPLES:
        raise CehrxError(f"zeroshot.label_sample must be one of {LABEL_SAMPLES}, got {how!r}")
    n = len(table)
    info = {"method": how, "labels_in_split": n}
    if not max_labels or n <= max_labels:
        return table, None, {**info, "kept": n}
    rng = np.random.default_rng(seed)
    if how == "uniform":
        idx = np.sort(rng.choice(n, int(max_labels), replace=False))
        return table.take(pa.array(idx)), None, {**info, "kept": len(idx)}
    y = table.column("boolean_value").to_numpy(zero_copy_only=False).astype(bool)
    pos, neg = np.flatnonzero(y), np.flatnonzero(~y)
    n_pos = min(len(pos), int(max_labels) // 2)
    n_neg = min(len(neg), int(max_labels) - n_pos)
    idx = np.sort(np.concatenate([rng.choice(pos, n_pos, replace=False), rng.choice(neg, n_neg, replace=False)]))
    w_pos, w_neg = len(pos) / max(n_pos, 1), len(neg) / max(n_neg, 1)
    weight = np.where(y[idx], w_pos, w_neg)
    return (
        table.take(pa.array(idx)),
        weight,
        {
            **info,
            "kept": len(idx),
            "positives": f"{n_pos} of {len(pos)}",
            "negatives": f"{n_neg} of {len(neg)}",
            "weight_positive": w_pos,
            "weight_negative": w_neg,
        },
    )


def labels_from(table: pa.Table, weight: np.ndarray | None = None) -> LabelInputs:
    from cehrx.probe.labels import times_seconds

    return LabelInputs(
        subject_id=table.column("subject_id").to_numpy().astype(np.int64),
        prediction_time=times_seconds(table.column("prediction_time")),
        boolean_value=table.column("boolean_value").to_numpy(zero_copy_only=False).astype(bool),
        weight=weight,
    )


# ------------------------------------------------------------------------------------ outputs


def finish(
    cfg: DictConfig,
    out: Path,
    vocab: Vocab,
    outcome: Outcome,
    labels: LabelInputs,
    results: pa.Table,
    zcfg: ZeroshotConfig,
    facts: dict[str, Any],
    recal: dict[str, Any] | None = None,
) -> dict[str, Any]:
    """Write predictions, details, metrics and the report into a finished output dir."""
    from cehrx.eval.metrics import binary_metrics
    from cehrx.eval.predictions import write_predictions
    from cehrx.eval.report import write_report

    rows = results.column("label_row").to_numpy()
    ok = results.column("has_history").to_numpy(zero_copy_only=False).astype(bool)
    kept = results.filter(pa.array(ok))
    lr = rows[ok]
    y, sid, t = labels.boolean_value[lr], labels.subject_id[lr], labels.prediction_time[lr]
    if not len(lr):
        raise CehrxError("no label has a history before its prediction time: nothing to predict")
    w = labels.weight[lr] if labels.weight is not None else None
    n_boot = int(cfg.zeroshot.get("n_boot", 1000))
    estimates = {
        e: finalize_probabilities(kept, e) for e in ESTIMATORS if e == "mc" or "hazard_probability" in kept.column_names
    }
    prob, fallback, rate = estimates[zcfg.estimator]
    raw = prob
    if recal is not None:  # the prediction is recalibrated; the model's own probability is kept beside it
        prob = recalibrate(prob, recal)
        recal = {**recal, "uncalibrated": binary_metrics(y, raw, sid, n_boot=n_boot, seed=zcfg.seed, sample_weight=w)}
    metrics = binary_metrics(y, prob, sid, n_boot=n_boot, seed=zcfg.seed, sample_weight=w)
    summary = futures_summary(kept, fallback, rate, len(rows) - len(lr))
    metrics.update(
        {
            "method": "zeroshot",
            "estimator": zcfg.estimator,
            "outcome": outcome.describe(vocab),
            "futures": summary,
            "run": facts,
            "labels_per_s": round(len(rows) / max(facts["seconds"], 1e-9), 2),
            "zeroshot": config_dict(zcfg),
        }
    )
    if len(estimates) > 1:
        metrics["estimators"] = compare_estimators(estimates, kept, y, sid, w, n_boot, zcfg.seed)
    if recal is not None:
        metrics["recalibration"] = recal
    with task_output(cfg, "zeroshot", overwrite=True) as tmp:  # its chunks already live in out: guarded in run()
        write_predictions(tmp / "predictions.parquet", sid, t, y, prob)
        det = details(kept, labels, lr, prob, fallback)
        pq.write_table(
            det if recal is None else det.append_column("probability_uncalibrated", pa.array(raw)),
            tmp / "details.parquet",
        )
        if zcfg.write_trajectories:
            write_trajectories(out, tmp / "trajectories", zcfg.num_samples)
        kind = f"zero-shot{' random-init' if facts['random_init'] else ''} ({zcfg.num_samples} futures"
        raw_metrics = metrics.get("estimators") or {zcfg.estimator: recal["uncalibrated"] if recal else metrics}
        shown = {f"{kind}, {e})": raw_metrics[e] for e in estimates}
        curves = {f"{kind}, {e})": (y, estimates[e][0]) for e in estimates}
        if recal is not None:
            name = f"{kind}, {zcfg.estimator}, recalibrated on tuning)"
            shown[name], curves[name] = metrics, (y, prob)
        write_report(
            tmp,
            f"Zero-shot: {facts['task'] or outcome.name}",
            shown,
            curves,
            sections=report_sections(outcome, summary, facts, metrics.get("estimators")),
            sample_weight=w,
        )
        write_marker(tmp, "zeroshot", metrics)
        # last: the chunks go with the finished run as hard links, so a kill before the final rename
        # leaves them in place for the rerun (a move would leave them in a temporary dir)
        shutil.copytree(out / CHUNK_DIR, tmp / CHUNK_DIR, copy_function=os.link)
        if (out / RECAL_DIR).is_dir():
            shutil.copytree(out / RECAL_DIR, tmp / RECAL_DIR, copy_function=os.link)
    auroc = metrics["auroc"]
    print(
        f"zeroshot: AUROC {auroc['value']:.3f} [{auroc['ci_low']:.3f}, {auroc['ci_high']:.3f}] on {metrics['n']} labels "
        f"({metrics['n_pos']} positive), {metrics['labels_per_s']} labels/s -> {out}",
        file=sys.stderr,
    )
    return metrics


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
    out["hazard"]["mean_label_se"] = float(np.nanmean(kept.column("hazard_se").to_numpy(zero_copy_only=False)))
    out["hazard - mc"] = paired_difference(y, sid, estimates["hazard"][0], [p_mc], n_boot, seed, sample_weight=w)
    return out


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
    for c in kept.column_names:
        if c not in ("label_row", "has_history", "probability"):
            cols[c] = kept.column(c)
    return pa.table(cols)


def futures_summary(kept: pa.Table, fallback: np.ndarray, rate: float, n_dropped: int) -> dict[str, Any]:
    col = {c: kept.column(c).to_numpy(zero_copy_only=False) for c in kept.column_names}
    n_fut = int(col["n_futures"].sum())
    days = col["expected_days"][np.isfinite(col["expected_days"])]
    return {
        "futures": n_fut,
        "resolved_share": round(float(col["n_resolved"].sum() / max(n_fut, 1)), 4),
        "with_outcome_share": round(float(col["n_outcome"].sum() / max(n_fut, 1)), 4),
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
            f"- {s['futures']} futures; resolved {s['resolved_share']:.1%}; with the outcome {s['with_outcome_share']:.1%}\n"
            f"- stops: {', '.join(f'{k} {v}' for k, v in s['stops'].items())}\n"
            f"- labels whose futures were all unresolved (given the cohort rate {s['fallback_probability']:.3f}): {s['labels_all_unresolved']}\n"
            f"- labels without a history before the prediction time (dropped): {s['labels_without_history']}\n"
            f"- median expected days to the outcome: {s['median_expected_days_to_outcome']:.0f}"
        ),
        **({"Estimators": _estimator_lines(estimators)} if estimators else {}),
        "Run": "\n".join(f"- {k}: {v}" for k, v in facts.items()),
    }


def _estimator_lines(e: dict[str, Any]) -> str:
    """Monte Carlo count vs hazard sum on the same futures (see cehrx.zeroshot.predict)."""
    lines = ["| estimator | AUROC (95 % CI) | AUPRC | Brier | mean per-label SE |", "|---|---|---|---|---|"]
    for name in ESTIMATORS:
        m = e[name]
        lines.append(
            f"| {name} | {m['auroc']['value']:.3f} [{m['auroc']['ci_low']:.3f}, {m['auroc']['ci_high']:.3f}] | "
            f"{m['auprc']['value']:.3f} | {m['brier']['value']:.4f} | {m['mean_label_se']:.4f} |"
        )
    d = e["hazard - mc"]["auroc"]
    lines.append(f"\nhazard - mc AUROC: {d['value']:+.3f} [{d['ci_low']:+.3f}, {d['ci_high']:+.3f}] (paired bootstrap)")
    return "\n".join(lines)


def _mtime(d: Path) -> float:
    files = [p for p in d.iterdir() if p.is_file()]
    return max((p.stat().st_mtime for p in files), default=0.0)


def _list(v: Any) -> list[str] | None:
    if v is None:
        return None
    if isinstance(v, str):
        return [v]
    return [str(x) for x in v]


def _float(v: Any) -> float | None:
    return None if v is None else float(v)


def _int(v: Any) -> int | None:
    return None if v is None else int(v)
