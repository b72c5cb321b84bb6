"""`cehrx task=probe`: patient embeddings at prediction time, scored by linear probing vs baselines.

    cehrx task=probe model_dir=runs/site/model labels_dir=/path/to/labels output_dir=runs/site/probe
    cehrx task=probe model_dir=runs/site/model probe.task=gibleed_after_nsaid

Steps: labels (MEDS label files, or an ACES task config run on the prepared MEDS data) ->
histories cut at each prediction time (`cehrx.data.history`) -> frozen-GPT embeddings
(`cehrx.probe.embed`) -> logistic regression on train + tuning, scored on held_out
(`cehrx.probe.evaluate`), side by side with count baselines on the same labels and splits, and
a few-shot curve.

Output (`output_dir`, written to a temporary sibling and renamed when complete):

    labels.parquet            the labels used (after dropping those without history), with split
    features.parquet          subject_id, prediction_time, boolean_value, split, embedding
    predictions.parquet       the probe's held-out predictions (meds-evaluation schema)
    predictions/<method>.parquet   every method's predictions, same schema
    metrics.json              metrics with 95 % CIs per method, few-shot curve, label counts
    report.md, roc.png        table + ROC plot (cehrx.eval.report)
    config.yaml               resolved config
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import torch
from omegaconf import DictConfig

from cehrx.errors import CehrxError
from cehrx.eval.metrics import binary_metrics, paired_difference
from cehrx.eval.predictions import write_predictions
from cehrx.eval.report import write_report
from cehrx.model.export import load_pretrained, random_init_like
from cehrx.model.export import model_dir as resolve_model_dir
from cehrx.probe import labels as L
from cehrx.probe.cohort import Cohort, build_cohort
from cehrx.probe.counts import baseline_features, column_selector
from cehrx.probe.embed import POOLINGS
from cehrx.probe.evaluate import (
    Protocol,
    choose_protocol,
    cross_fit,
    few_shot,
    scored_rows,
)
from cehrx.probe.feature_cache import Embedder, weights_sha256
from cehrx.probe.report import report_sections, report_title
from cehrx.tasks.inputs import prepared_dir_for
from cehrx.tasks.scaffold import guard, task_output, write_marker

log = logging.getLogger("cehrx.probe")
BASELINES = (
    "counts",
    "counts_hgb",
    "counts_window",
)  # counts_window: the model's own window, bag of tokens (a diagnostic)


def run(cfg: DictConfig) -> dict[str, Any]:
    p = cfg.probe
    bad = [b for b in (p.baselines or []) if b not in BASELINES]
    if bad:
        raise CehrxError(f"probe.baselines: unknown {bad} (choose from {list(BASELINES)})")
    if str(p.pooling) not in POOLINGS:
        raise CehrxError(f"probe.pooling must be one of {POOLINGS}, got {p.pooling!r}")
    if p.random_init and int(p.get("random_init_seeds", 1)) < 1:
        raise CehrxError(f"probe.random_init_seeds must be >= 1 with probe.random_init=true, got {p.random_init_seeds}")
    mdir = resolve_model_dir(cfg.model_dir)
    prepared = prepared_dir_for(cfg, mdir)
    out = Path(str(cfg.output_dir))
    guard("probe", out, bool(cfg.overwrite))
    start = time.perf_counter()
    timings: dict[str, float] = {}
    table, source = L.read_labels(cfg, prepared)
    timings["labels"] = _lap(start)
    with task_output(cfg, "probe") as tmp:
        result = probe(cfg, mdir, prepared, table, source, tmp, timings)
        write_marker(tmp, "probe", result)
    _print_summary(result, out)
    return result


def probe(cfg: DictConfig, mdir: Path, prepared: Path, table: pa.Table, source: dict, tmp: Path, timings: dict) -> dict:
    """The probe stage by stage (each timed into `timings`); writes every output file into `tmp`."""
    p = cfg.probe
    seed = int(p.seed)
    torch.manual_seed(seed)
    model, vocab = load_pretrained(mdir)
    max_len = int(p.max_len or model.config.max_seq_len)
    if max_len > model.config.max_seq_len:
        raise CehrxError(f"probe.max_len={max_len} exceeds the model's max_seq_len={model.config.max_seq_len}")
    t0 = time.perf_counter()
    test_split = str(cfg.get("split") or "held_out")
    if len(table) > 50_000 and not p.get("cache_dir"):
        log.warning(
            "%d labels: each costs a forward pass (minutes per 10,000 on CPU); probe.train_label_fraction thins the "
            "training side and probe.cache_dir keeps the features for later runs",
            len(table),
        )
    cohort = build_cohort(p, prepared, vocab, table, max_len, test_split)
    timings["histories"] = _lap(t0)

    t0 = time.perf_counter()
    embedder = Embedder(p, cohort.hist, cohort.sid, prepared, max_len)
    features = embed_features(p, embedder, model, mdir, seed)
    timings["embed"] = _lap(t0)
    write_features(tmp, cohort, features)

    protocol = choose_protocol(
        cohort.split, cohort.y, cohort.sid, str(p.evaluation), int(p.min_test_class), int(p.cv_folds), seed, test_split
    )
    # count columns are chosen per fold on that fold's training histories (cross_fit's `columns`)
    t0 = time.perf_counter()
    min_code_labels = int(p.min_code_labels)
    counts, count_info = baseline_features(
        p.baselines or [], prepared, cohort.labels, cohort.hist, len(vocab), None, min_code_labels
    )
    selectors = {name: column_selector(name, X, min_code_labels) for name, X in counts.items()}
    features |= counts
    timings["count_features"] = _lap(t0)

    t0 = time.perf_counter()
    scores = score_methods(p, cohort, features, selectors, protocol, test_split, tmp, count_info)
    timings["fit_score"] = _lap(t0)

    result = summary(
        cfg, source, mdir, prepared, table, cohort, protocol, scores.methods, scores.few_shot, timings, max_len
    )
    result["feature_cache"] = embedder.report()
    result["count_features"] = count_info
    annotate_scoring(result, cohort, protocol, scores, test_split)
    result["random_init_seeds"] = random_init_summary(scores.methods, seed)
    result["paired"] = paired_comparisons(scores.curves, cohort.sid[protocol.test_rows], int(p.n_boot), seed)
    pq.write_table(cohort.labels_with_split(), tmp / "labels.parquet")
    write_report(tmp, report_title(source), dict(scores.methods), scores.curves, sections=report_sections(result))
    return result


def embed_features(p: DictConfig, embedder: Embedder, model, mdir: Path, seed: int) -> dict[str, np.ndarray]:
    """The pretrained model's embeddings (`probe`), then one set per random-init control.

    Several random draws (`probe.random_init_seeds`): one random model is a noisy control."""
    features = {"probe": embedder(model, {"model_sha256": weights_sha256(mdir)})}
    for k in range(int(p.get("random_init_seeds", 1)) if p.random_init else 0):
        rand = random_init_like(model, seed + k)
        features[random_init_name(k)] = embedder(
            rand, {"random_init_seed": seed + k, "config": rand.config.to_dict(), "torch": torch.__version__}
        )
    return features


@dataclass
class Scores:
    """What `score_methods` found for every method, keyed by method name."""

    methods: dict[str, dict] = field(default_factory=dict)  # metrics on the scored rows (+ `classifier`)
    curves: dict[str, tuple[np.ndarray, np.ndarray]] = field(default_factory=dict)  # (y, p) on the scored rows
    few_shot: dict[str, list] = field(default_factory=dict)
    split_only: dict[str, dict | None] = field(default_factory=dict)  # the requested split's rows (cross-fitting)


def score_methods(
    p: DictConfig,
    cohort: Cohort,
    features: dict[str, np.ndarray],
    selectors: dict,
    protocol: Protocol,
    test_split: str,
    tmp: Path,
    count_info: dict,
) -> Scores:
    """Fit and score every feature set under one protocol, write its predictions, and its few-shot curve.

    `counts_hgb` gets gradient boosting, the others logistic regression; count baselines choose
    their columns per fold (`selectors`), recorded in `count_info["columns_kept"]`."""
    seed, y, sid = int(p.seed), cohort.y, cohort.sid
    test = protocol.test_rows
    on_split = test[cohort.split[test] == test_split]  # the requested split's rows (all of `test` unless cross-fitted)
    scores = Scores()
    for name, X in features.items():
        kind = "hgb" if name == "counts_hgb" else "logistic"
        probs, infos = cross_fit(X, y, sid, protocol, kind, seed, columns=selectors.get(name))
        if name in selectors:
            count_info.setdefault("columns_kept", {})[name] = [i["columns"] for i in infos]
        m = binary_metrics(y[test], probs[test], sid[test], n_boot=int(p.n_boot), seed=seed)
        m["classifier"] = infos
        scores.methods[name] = m
        scores.curves[name] = (y[test], probs[test])
        if protocol.mode != "split":
            scores.split_only[name] = _split_metrics(y[on_split], probs[on_split], sid[on_split], int(p.n_boot), seed)
        _write_method_predictions(tmp, name, cohort, probs, test, on_split)
        if kind == "logistic" and p.few_shot and name in ("probe", "random_init", "counts"):
            X_fs = X[:, selectors[name](protocol.folds[0][0])] if name in selectors else X
            curve = few_shot(
                X_fs, y, sid, protocol, list(p.few_shot), int(p.few_shot_repeats), kind, seed, all_probs=probs
            )
            if curve:  # none under cross-fitting
                scores.few_shot[name] = curve
    return scores


def _write_method_predictions(
    tmp: Path, name: str, cohort: Cohort, probs: np.ndarray, test: np.ndarray, on_split: np.ndarray
) -> None:
    """`predictions/<name>.parquet` on every scored row; for the probe also `predictions.parquet`,
    the deliverable (MEDS-DEV): the requested split's labels only, never a pretraining subject's."""
    rows = {tmp / "predictions" / f"{name}.parquet": test}
    if name == "probe":
        rows[tmp / "predictions.parquet"] = on_split
    for path, r in rows.items():
        times = cohort.labels.take(pa.array(r)).column("prediction_time")
        write_predictions(path, cohort.sid[r], times, cohort.y[r], probs[r])


def annotate_scoring(result: dict, cohort: Cohort, protocol: Protocol, scores: Scores, test_split: str) -> None:
    """What was scored where, into `result`: label counts, the split, `split_only` under
    cross-fitting, and a warning when the scored labels include pretraining subjects."""
    test = protocol.test_rows
    on_split = test[cohort.split[test] == test_split]
    result["labels"]["in"] = cohort.n_in
    result["labels"]["thinned"] = cohort.thinned
    result["split"] = test_split
    result["scored"]["split"] = test_split
    result["scored"]["by_split"] = {s: int((cohort.split[test] == s).sum()) for s in ("train", "tuning", "held_out")}
    result["warnings"] = []
    if protocol.mode != "split":
        result["split_only"] = {
            "split": test_split,
            "labels": len(on_split),
            "positives": int(cohort.y[on_split].sum()),
            "methods": scores.split_only,
        }
    if result["scored"]["pretraining_labels"]:
        warning = (
            f"{result['scored']['pretraining_labels']} of the {result['scored']['labels']} labels the metrics "
            f"rest on are of subjects in the `train` split the model was pretrained on ({result['evaluation']} "
            f"cross-fitting, since split={test_split} is too small to score): the model saw their outcomes, so "
            f"`methods` is optimistic against random init and counts; `split_only` scores the {len(on_split)} "
            f"{test_split} labels alone, and predictions.parquet holds only those"
        )
        result["warnings"].append(warning)
        log.warning(warning)


def _split_metrics(y: np.ndarray, p: np.ndarray, sid: np.ndarray, n_boot: int, seed: int) -> dict | None:
    """Metrics on the requested split's rows of a cross-fit; None when they hold one class only."""
    if len(y) == 0 or y.all() or not y.any():
        return None
    return binary_metrics(y, p, sid, n_boot=n_boot, seed=seed)


def random_init_name(k: int) -> str:
    """Method name of the k-th random-init control (seed + k): `random_init`, `random_init_2`, ..."""
    return "random_init" if k == 0 else f"random_init_{k + 1}"


def random_init_summary(methods: dict, seed: int) -> dict | None:
    """The probe against the spread of its random-init controls (AUROC per seed, mean, sd).

    Why: with a few hundred held-out labels, two random initialisations of the same architecture
    differ by several AUROC points, so one random model is a noisy bar; the mean over seeds is
    the fair one, and the per-seed values show how often the probe beats a single draw.
    """
    names = [n for n in methods if n == "random_init" or n.startswith("random_init_")]
    if not names or "probe" not in methods:
        return None
    aurocs = np.array([methods[n]["auroc"]["value"] for n in names], dtype=float)
    probe_auroc = float(methods["probe"]["auroc"]["value"])
    return {
        "seeds": [seed + k for k in range(len(names))],
        "methods": names,
        "auroc": aurocs.round(4).tolist(),
        "auroc_mean": float(aurocs.mean()),
        "auroc_sd": float(aurocs.std(ddof=1)) if len(aurocs) > 1 else 0.0,
        "probe_auroc": probe_auroc,
        "probe_minus_mean": probe_auroc - float(aurocs.mean()),
        "probe_beats": int((probe_auroc > aurocs).sum()),
    }


def paired_comparisons(
    curves: dict[str, tuple[np.ndarray, np.ndarray]], sid_test: np.ndarray, n_boot: int, seed: int
) -> dict:
    """The probe minus each control on the same subject-bootstrap draws (`cehrx.eval.metrics.paired_difference`):
    the mean of the random-init seeds, and each count baseline."""
    if "probe" not in curves or n_boot <= 0:
        return {}
    y, p = curves["probe"]
    controls = {"random_init": [curves[n][1] for n in curves if n == "random_init" or n.startswith("random_init_")]}
    controls |= {b: [curves[b][1]] for b in BASELINES if b in curves}
    return {
        f"probe - {name}": paired_difference(y, sid_test, p, ps, n_boot, seed) for name, ps in controls.items() if ps
    }


def write_features(out: Path, cohort: Cohort, features: dict[str, np.ndarray]) -> None:
    """`features.parquet` (the model's embedding) and `features_<method>.parquet` for other models."""
    for name, X in features.items():
        c = X.shape[1]
        emb = pa.FixedSizeListArray.from_arrays(pa.array(np.ascontiguousarray(X, dtype=np.float32).ravel()), c)
        t = cohort.labels_with_split().append_column("embedding", emb)
        pq.write_table(t, out / ("features.parquet" if name == "probe" else f"features_{name}.parquet"))


def summary(
    cfg,
    source,
    mdir,
    prepared,
    table,
    cohort: Cohort,
    protocol: Protocol,
    methods,
    fs,
    timings,
    max_len,
) -> dict:
    """metrics.json's body: inputs, label counts by split, what was scored, the histories, the methods."""
    kept, split, y, hist = cohort.labels, cohort.split, cohort.y, cohort.hist
    by_split = {
        s: {
            "n": int((split == s).sum()),
            "n_pos": int(y[split == s].sum()),
            "subjects": len(np.unique(kept.column("subject_id").to_numpy()[split == s])),
        }
        for s in ("train", "tuning", "held_out")
    }
    return {
        **source,
        "model_dir": str(mdir),
        "prepared_dir": str(prepared),
        "evaluation": protocol.mode if protocol.mode == "split" else f"cv{len(protocol.folds)}",
        "labels": {
            "in": len(table),
            "used": len(kept),
            "positives": int(y.sum()),
            "dropped": hist.dropped,
            "by_split": by_split,
        },
        "scored": scored_rows(split, y, kept.column("subject_id").to_numpy(), protocol),
        "history": {
            "max_len": max_len,
            "pooling": str(cfg.probe.pooling),
            **hist.stats,
            "mean_tokens": float(hist.lengths().mean()) if len(hist) else 0.0,
        },
        "methods": methods,
        "few_shot": fs,
        "timings_s": timings,
    }


def _lap(t0: float) -> float:
    return round(time.perf_counter() - t0, 2)


def _print_summary(result: dict, out: Path) -> None:
    import sys

    from cehrx.eval.metrics import format_metric

    parts = [f"{k} AUROC {format_metric(v['auroc'])}" for k, v in result["methods"].items()]
    print(
        f"probe: {result['labels']['used']} labels ({result['labels']['positives']} positive), "
        + "; ".join(parts)
        + f" -> {out}",
        file=sys.stderr,
    )
