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
                          (a `zeroshot.estimator=reach` run: the reach_* columns instead of all these
                          estimates, as its futures are not the model's natural ones)
    metrics.json          AUROC, AUPRC, Brier, ECE with subject-level bootstrap CIs + run facts; with
                          both estimators (`estimators`: mc and hazard, and their paired difference),
                          or for a reach run `reach` (its mean per-label SE and why it stands alone)
    report.md, roc.png    the report format `probe` writes
    trajectories/<j>.parquet   sample j of every label as MEDS rows (zeroshot.write_trajectories)
    chunks/               per-chunk results (hard links of the run's work/chunks)
    config.yaml           the resolved config

While it runs, the chunks are made in `output_dir/work/chunks` (`claim_chunks`, `data/workdir.claim_work_dir`):
an interrupted run resumes from them. A finished output holds no `work/`, so `overwrite=true` starts its
work there and leaves the finished output, its `chunks/` included, whole until the new one replaces it; an
interrupted `overwrite=true` run resumes its `work/` when rerun with the same settings.
"""

from __future__ import annotations

import logging
import os
import shutil
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
from omegaconf import DictConfig, OmegaConf

from cehrx.data.atomic import link_or_copy
from cehrx.data.history import load_all_splits
from cehrx.data.vocab import Vocab
from cehrx.errors import CehrxError
from cehrx.sampling import Engine
from cehrx.tasks.inputs import prepared_dir_for
from cehrx.tasks.scaffold import guard, is_finished, task_output, write_marker
from cehrx.zeroshot.controls import describe as describe_controls
from cehrx.zeroshot.labels import labels_from, sample_labels, select_split
from cehrx.zeroshot.outcome import Outcome, resolve_outcome
from cehrx.zeroshot.predict import (
    CHUNK_DIR,
    ESTIMATE_COLUMNS,
    ESTIMATORS,
    LabelInputs,
    ZeroshotConfig,
    claim_chunks,
    config_dict,
    finalize_probabilities,
    fingerprint,
    run_chunks,
    run_settings,
    sampling_dict,
    write_trajectories,
    zeroshot_engine,
)
from cehrx.zeroshot.report import compare_estimators, details, futures_summary, reach_summary, report_sections

log = logging.getLogger("cehrx.zeroshot")

WORK = "work"  # `output_dir/work`: the chunks while the run is not finished (see the module doc)
RECAL_DIR = "recalibration"


def run(cfg: DictConfig) -> dict[str, Any]:
    """Labels -> histories -> sampled futures -> probabilities -> predictions, metrics, report."""
    from cehrx.probe.labels import read_labels

    out = Path(cfg.output_dir)
    guard("zeroshot", out, bool(cfg.overwrite))
    work = out / WORK
    if not is_finished("zeroshot", out):
        adopt_earlier_chunks(out, work)
    zc = cfg.zeroshot
    zcfg = ZeroshotConfig.from_mapping(
        OmegaConf.to_container(zc, resolve=True), OmegaConf.to_container(cfg.sampling, resolve=True)
    )
    device, model, vocab = load_model(cfg, zcfg)
    prepared = prepared_dir_for(cfg, cfg.model_dir)
    check_vocab(vocab, prepared)
    outcome = outcome_of(cfg, vocab, prepared)
    arrays, split_of = load_all_splits(prepared)
    all_labels, label_source = read_labels(cfg, prepared)
    split = str(cfg.get("split") or "held_out")
    labels, sample_info = sampled_labels(zc, zcfg, select_split(all_labels, arrays.subject_id, split_of, split))
    engine = zeroshot_engine(model, vocab, zcfg, outcome)
    fp = fingerprint(run_identity(cfg, vocab, outcome, prepared, split, zcfg, engine), labels)
    # the same run's chunks resume, also under overwrite (an interrupted overwrite run); other chunks only with it
    resumed = claim_chunks(work, fp, bool(cfg.overwrite))
    if resumed:
        print(f"zeroshot: resuming, {resumed} chunk(s) already done in {work / CHUNK_DIR}", file=sys.stderr)
    start = time.perf_counter()
    results = run_chunks(engine, arrays, labels, outcome, zcfg, work, progress=bool(zc.get("progress", True)))
    seconds = time.perf_counter() - start
    recal = None
    if bool(zc.get("recalibrate", False)):
        recal = recalibration(cfg, engine, arrays, split_of, all_labels, outcome, zcfg, work, fp)
    facts = {
        "task": OmegaConf.select(cfg, "probe.task"),
        "label_source": label_source,
        "split": split,
        "prepared_dir": str(prepared),
        "model_dir": str(cfg.model_dir),
        "random_init": bool(zc.get("random_init", False)),
        "device": str(device),
        "seconds": round(seconds, 1),
        "resumed_chunks": resumed,
        "label_sample": sample_info,
    }
    return finish(cfg, work, vocab, outcome, labels, results, zcfg, facts, recal)


def adopt_earlier_chunks(out: Path, work: Path) -> None:
    """An unfinished output of an earlier version kept its chunks in `output_dir/chunks` (and
    `recalibration/chunks`): move them into `work`, so such an interrupted run still resumes."""
    for rel in (Path(CHUNK_DIR), Path(RECAL_DIR) / CHUNK_DIR):
        if (out / rel).is_dir() and not (work / rel).exists():
            (work / rel).parent.mkdir(parents=True, exist_ok=True)
            os.replace(out / rel, work / rel)


def load_model(cfg: DictConfig, zcfg: ZeroshotConfig) -> tuple[Any, Any, Vocab]:
    """(device, model, vocab); with `zeroshot.random_init` the same architecture with fresh weights."""
    from cehrx.model.export import load_pretrained, random_init_like, resolve_device

    device = resolve_device(str(cfg.zeroshot.get("device", "auto")), "zeroshot.device")
    model, vocab = load_pretrained(cfg.model_dir, map_location=device)
    if bool(cfg.zeroshot.get("random_init", False)):
        model = random_init_like(model, zcfg.seed)
    return device, model, vocab


def outcome_of(cfg: DictConfig, vocab: Vocab, prepared: Path) -> Outcome:
    zc = cfg.zeroshot
    return resolve_outcome(
        vocab,
        OmegaConf.select(cfg, "probe.task"),
        _list(zc.get("outcome_codes")),
        _float(zc.get("window_days")),
        _int(zc.get("window_visits")),
        prepared,
        bool(zc.get("include_descendants", True)),
    )


def sampled_labels(zc: DictConfig, zcfg: ZeroshotConfig, table: pa.Table) -> tuple[LabelInputs, dict]:
    """The split's labels after `zeroshot.max_labels` / `label_sample` (seeded by `label_seed`)."""
    how = str(zc.get("label_sample") or "uniform")
    table, weight, info = sample_labels(table, _int(zc.get("max_labels")), how, int(zc.get("label_seed", zcfg.seed)))
    return labels_from(table, weight), info


def _records_controls(engine: Engine | None) -> bool:
    return engine is not None and engine.control is not None


def run_identity(
    cfg: DictConfig,
    vocab: Vocab,
    outcome: Outcome,
    prepared: Path,
    split: str,
    zcfg: ZeroshotConfig,
    engine: Engine | None = None,
) -> dict[str, Any]:
    """Everything but the labels that the chunks depend on (hashed with the labels by `fingerprint`); with an
    engine that records control expectations, also the control basis's layout (`controls.describe`)."""
    from cehrx.model.export import model_dir

    return {
        "model": str(model_dir(cfg.model_dir).resolve()),
        "model_mtime": _mtime(model_dir(cfg.model_dir)),
        "outcome": outcome.describe(vocab),
        "prepared": str(prepared.resolve()),
        "random_init": bool(cfg.zeroshot.get("random_init", False)),
        "split": split,
        # mc and hazard read the same futures (the chunks hold both); reach samples futures of its own, and
        # hazard_cv's chunks also hold the control variates' sums (they serve mc and hazard too, not the reverse)
        "zeroshot": {k: v for k, v in run_settings(zcfg).items() if k != "estimator" or v in ("reach", "hazard_cv")},
        **(
            {"controls": describe_controls(engine.control.shape[1], outcome.window)}
            if _records_controls(engine)
            else {}
        ),
    }


def recalibration(
    cfg: DictConfig,
    engine: Engine,
    arrays: Any,
    split_of: np.ndarray,
    table: pa.Table,
    outcome: Outcome,
    zcfg: ZeroshotConfig,
    work: Path,
    fp: str,
) -> dict[str, Any]:
    """Platt scaling of the chosen estimator, fitted on zero-shot predictions for the tuning split's labels
    (sampled as the test labels are, in `<work>/recalibration/chunks`, resumable): on the logit of
    the raw probability, a weighted logistic regression gives `sigmoid(a * logit(p) + b)`. The model's
    own probabilities stay in `details.parquet` (`probability_uncalibrated`)."""
    from sklearn.linear_model import LogisticRegression

    zc = cfg.zeroshot
    labels, info = sampled_labels(zc, zcfg, select_split(table, arrays.subject_id, split_of, "tuning"))
    tuning_work = work / RECAL_DIR
    claim_chunks(tuning_work, fingerprint({"test_run": fp, "split": "tuning"}, labels), bool(cfg.overwrite))
    res = run_chunks(engine, arrays, labels, outcome, zcfg, tuning_work, progress=bool(zc.get("progress", True)))
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


# ------------------------------------------------------------------------------------ outputs


@dataclass
class Scored:
    """The labels that have a history, their outcomes and each estimator's probabilities."""

    kept: pa.Table  # the chunk rows of these labels
    rows: np.ndarray  # label rows
    n_labels: int  # all labels, with a history or not
    y: np.ndarray
    sid: np.ndarray
    time: np.ndarray
    weight: np.ndarray | None
    estimates: dict[str, tuple]  # estimator -> (probability, fallback, fallback rate)
    prob: np.ndarray  # the prediction (recalibrated when asked)
    raw: np.ndarray  # the chosen estimator's own probability


def scored(results: pa.Table, labels: LabelInputs, zcfg: ZeroshotConfig, recal: dict[str, Any] | None) -> Scored:
    rows = results.column("label_row").to_numpy()
    ok = results.column("has_history").to_numpy(zero_copy_only=False).astype(bool)
    kept, lr = results.filter(pa.array(ok)), rows[ok]
    if not len(lr):
        raise CehrxError("no label has a history before its prediction time: nothing to predict")
    estimates = {e: finalize_probabilities(kept, e) for e in ESTIMATORS if ESTIMATE_COLUMNS[e][0] in kept.column_names}
    raw = estimates[zcfg.estimator][0]
    prob = raw if recal is None else recalibrate(raw, recal)  # the model's own probability is kept beside it
    w = labels.weight[lr] if labels.weight is not None else None
    y, sid, t = labels.boolean_value[lr], labels.subject_id[lr], labels.prediction_time[lr]
    return Scored(kept, lr, len(rows), y, sid, t, w, estimates, prob, raw)


def finish(
    cfg: DictConfig,
    work: Path,
    vocab: Vocab,
    outcome: Outcome,
    labels: LabelInputs,
    results: pa.Table,
    zcfg: ZeroshotConfig,
    facts: dict[str, Any],
    recal: dict[str, Any] | None = None,
) -> dict[str, Any]:
    """Write predictions, details, metrics and the report into a finished output dir, with the chunks of `work`."""
    from cehrx.eval.metrics import binary_metrics

    out = Path(cfg.output_dir)
    sc = scored(results, labels, zcfg, recal)
    n_boot = int(cfg.zeroshot.get("n_boot", 1000))
    if recal is not None:
        uncal = binary_metrics(sc.y, sc.raw, sc.sid, n_boot=n_boot, seed=zcfg.seed, sample_weight=sc.weight)
        recal = {**recal, "uncalibrated": uncal}
    metrics = binary_metrics(sc.y, sc.prob, sc.sid, n_boot=n_boot, seed=zcfg.seed, sample_weight=sc.weight)
    _, fallback, rate = sc.estimates[zcfg.estimator]
    summary = futures_summary(sc.kept, fallback, rate, sc.n_labels - len(sc.rows))
    metrics.update(
        {
            "method": "zeroshot",
            "estimator": zcfg.estimator,
            "outcome": outcome.describe(vocab),
            "futures": summary,
            "run": facts,
            "labels_per_s": round(sc.n_labels / max(facts["seconds"], 1e-9), 2),
            "zeroshot": config_dict(zcfg),
            "sampling": sampling_dict(zcfg),
        }
    )
    if {"mc", "hazard"} <= set(sc.estimates):
        metrics["estimators"] = compare_estimators(sc.estimates, sc.kept, sc.y, sc.sid, sc.weight, n_boot, zcfg.seed)
    if zcfg.reach:
        metrics["reach"] = reach_summary(sc.kept)
    if recal is not None:
        metrics["recalibration"] = recal
    with task_output(cfg, "zeroshot") as tmp:  # replaces `out` (and so `work`) once complete
        write_outputs(tmp, work, sc, labels, outcome, zcfg, facts, metrics, summary, recal)
    auroc = metrics["auroc"]
    print(
        f"zeroshot: AUROC {auroc['value']:.3f} [{auroc['ci_low']:.3f}, {auroc['ci_high']:.3f}] on {metrics['n']} labels "
        f"({metrics['n_pos']} positive), {metrics['labels_per_s']} labels/s -> {out}",
        file=sys.stderr,
    )
    return metrics


def write_outputs(
    tmp: Path,
    work: Path,
    sc: Scored,
    labels: LabelInputs,
    outcome: Outcome,
    zcfg: ZeroshotConfig,
    facts: dict[str, Any],
    metrics: dict[str, Any],
    summary: dict[str, Any],
    recal: dict[str, Any] | None,
) -> None:
    """predictions, details, trajectories, report, metrics.json, then the chunks of `work`, into `tmp`."""
    from cehrx.eval.predictions import write_predictions
    from cehrx.eval.report import write_report

    write_predictions(tmp / "predictions.parquet", sc.sid, sc.time, sc.y, sc.prob)
    det = details(sc.kept, labels, sc.rows, sc.prob, sc.estimates[zcfg.estimator][1])
    pq.write_table(
        det if recal is None else det.append_column("probability_uncalibrated", pa.array(sc.raw)),
        tmp / "details.parquet",
    )
    if zcfg.write_trajectories:
        write_trajectories(work, tmp / "trajectories", zcfg.num_samples)
    kind = f"zero-shot{' random-init' if facts['random_init'] else ''} ({zcfg.num_samples} futures"
    raw_metrics = metrics.get("estimators") or {zcfg.estimator: recal["uncalibrated"] if recal else metrics}
    shown = {f"{kind}, {e})": raw_metrics[e] for e in sc.estimates}
    curves = {f"{kind}, {e})": (sc.y, sc.estimates[e][0]) for e in sc.estimates}
    if recal is not None:
        name = f"{kind}, {zcfg.estimator}, recalibrated on tuning)"
        shown[name], curves[name] = metrics, (sc.y, sc.prob)
    write_report(
        tmp,
        f"Zero-shot: {facts['task'] or outcome.name}",
        shown,
        curves,
        sections=report_sections(outcome, summary, facts, metrics.get("estimators") or metrics.get("reach")),
        sample_weight=sc.weight,
    )
    write_marker(tmp, "zeroshot", metrics)
    # last: the chunks go with the finished run as hard links (copies where links are refused), so a
    # kill before the final rename leaves them in place for the rerun (a move would leave them in a temporary dir)
    shutil.copytree(work / CHUNK_DIR, tmp / CHUNK_DIR, copy_function=link_or_copy)
    if (work / RECAL_DIR).is_dir():
        shutil.copytree(work / RECAL_DIR, tmp / RECAL_DIR, copy_function=link_or_copy)


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
