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
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import torch
from omegaconf import DictConfig

from cehrx.data.history import Histories
from cehrx.errors import CehrxError
from cehrx.eval.metrics import binary_metrics, paired_difference
from cehrx.eval.predictions import write_predictions
from cehrx.eval.report import write_report
from cehrx.model.export import load_pretrained, random_init_like
from cehrx.model.export import model_dir as resolve_model_dir
from cehrx.probe import labels as L
from cehrx.probe.cohort import build_cohort
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
    kept, hist, sid, y, split = cohort.labels, cohort.hist, cohort.sid, cohort.y, cohort.split
    timings["histories"] = _lap(t0)

    features: dict[str, Any] = {}
    t0 = time.perf_counter()
    embedder = Embedder(p, hist, sid, prepared, max_len)
    features["probe"] = embedder(model, {"model_sha256": weights_sha256(mdir)})
    for k in range(
        int(p.get("random_init_seeds", 1)) if p.random_init else 0
    ):  # several draws: one random model is a noisy control
        rand = random_init_like(model, seed + k)
        features[random_init_name(k)] = embedder(
            rand, {"random_init_seed": seed + k, "config": rand.config.to_dict(), "torch": torch.__version__}
        )
    timings["embed"] = _lap(t0)
    write_features(tmp, kept, split, features)

    protocol = choose_protocol(
        split, y, sid, str(p.evaluation), int(p.min_test_class), int(p.cv_folds), seed, test_split
    )
    # count columns are chosen per fold on that fold's training histories (cross_fit's `columns`)
    t0 = time.perf_counter()
    min_code_labels = int(p.min_code_labels)
    counts, count_info = baseline_features(p.baselines or [], prepared, kept, hist, len(vocab), None, min_code_labels)
    selectors = {name: column_selector(name, X, min_code_labels) for name, X in counts.items()}
    features |= counts
    timings["count_features"] = _lap(t0)

    t0 = time.perf_counter()
    methods, curves, fs = {}, {}, {}
    test = protocol.test_rows
    on_split = test[split[test] == test_split]  # the requested split's rows (all of `test` unless cross-fitted)
    split_only: dict[str, Any] = {}
    for name, X in features.items():
        kind = "hgb" if name == "counts_hgb" else "logistic"
        probs, infos = cross_fit(X, y, sid, protocol, kind, seed, columns=selectors.get(name))
        if name in selectors:
            count_info.setdefault("columns_kept", {})[name] = [i["columns"] for i in infos]
        m = binary_metrics(y[test], probs[test], sid[test], n_boot=int(p.n_boot), seed=seed)
        m["classifier"] = infos
        methods[name] = m
        curves[name] = (y[test], probs[test])
        if protocol.mode != "split":
            split_only[name] = _split_metrics(y[on_split], probs[on_split], sid[on_split], int(p.n_boot), seed)
        kept_test = kept.take(pa.array(test))
        write_predictions(
            tmp / "predictions" / f"{name}.parquet",
            sid[test],
            kept_test.column("prediction_time"),
            y[test],
            probs[test],
        )
        if (
            name == "probe"
        ):  # the deliverable (MEDS-DEV): the requested split's labels only, never a pretraining subject's
            write_predictions(
                tmp / "predictions.parquet",
                sid[on_split],
                kept.take(pa.array(on_split)).column("prediction_time"),
                y[on_split],
                probs[on_split],
            )
        if kind == "logistic" and p.few_shot and name in ("probe", "random_init", "counts"):
            X_fs = X[:, selectors[name](protocol.folds[0][0])] if name in selectors else X
            curve = few_shot(
                X_fs, y, sid, protocol, list(p.few_shot), int(p.few_shot_repeats), kind, seed, all_probs=probs
            )
            if curve:  # none under cross-fitting
                fs[name] = curve
    timings["fit_score"] = _lap(t0)

    result = summary(cfg, source, mdir, prepared, table, kept, split, y, hist, protocol, methods, fs, timings, max_len)
    result["labels"]["in"] = cohort.n_in
    result["labels"]["thinned"] = cohort.thinned
    result["feature_cache"] = embedder.report()
    result["count_features"] = count_info
    result["split"] = test_split
    result["scored"]["split"] = test_split
    result["scored"]["by_split"] = {s: int((split[test] == s).sum()) for s in ("train", "tuning", "held_out")}
    result["warnings"] = []
    if protocol.mode != "split":
        result["split_only"] = {
            "split": test_split,
            "labels": len(on_split),
            "positives": int(y[on_split].sum()),
            "methods": split_only,
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
    result["random_init_seeds"] = random_init_summary(methods, seed)
    result["paired"] = paired_comparisons(curves, sid[test], int(p.n_boot), seed)
    pq.write_table(kept.append_column("split", pa.array(split.astype(str))), tmp / "labels.parquet")
    write_report(
        tmp, report_title(source), {k: v for k, v in methods.items()}, curves, sections=report_sections(result)
    )
    return result


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


def write_features(out: Path, kept: pa.Table, split: np.ndarray, features: dict[str, np.ndarray]) -> None:
    """`features.parquet` (the model's embedding) and `features_<method>.parquet` for other models."""
    for name, X in features.items():
        c = X.shape[1]
        emb = pa.FixedSizeListArray.from_arrays(pa.array(np.ascontiguousarray(X, dtype=np.float32).ravel()), c)
        t = kept.append_column("split", pa.array(split.astype(str))).append_column("embedding", emb)
        pq.write_table(t, out / ("features.parquet" if name == "probe" else f"features_{name}.parquet"))


def summary(
    cfg,
    source,
    mdir,
    prepared,
    table,
    kept,
    split,
    y,
    hist: Histories,
    protocol: Protocol,
    methods,
    fs,
    timings,
    max_len,
) -> dict:
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


def report_title(source: dict) -> str:
    return f"Linear probe: {source.get('task') or source.get('labels_dir')}"


def report_sections(result: dict) -> dict[str, str]:
    lab = result["labels"]
    rows = [
        f"- labels: {lab['in']} in, {lab['used']} used ({lab['positives']} positive); dropped: "
        + (", ".join(f"{k} {v}" for k, v in lab["dropped"].items() if v) or "none")
    ]
    for s, d in lab["by_split"].items():
        rows.append(f"- {s}: {d['n']} labels ({d['n_pos']} positive), {d['subjects']} subjects")
    ev = result["evaluation"]
    rows.append(
        f"- evaluation: {'fit on train + tuning, scored on held_out' if ev == 'split' else ev + ' subject-grouped cross-fitting over all labels (held_out too small)'}"
    )
    sc = result["scored"]
    rows.append(
        f"- scored: {sc['labels']} labels ({sc['positives']} positive) from {sc['subjects']} subjects "
        f"({sc['positive_subjects']} with a positive label)"
    )
    if sc["pretraining_labels"]:
        rows.append(
            f"- **note**: {sc['pretraining_labels']} scored labels ({sc['pretraining_subjects']} subjects) are from the `train` split "
            "the model was pretrained on; it saw their whole timelines, outcomes included, which favours the pretrained "
            "embedding over random init and the count baselines"
        )
    only = result.get("split_only")
    if only:
        shown = [
            f"{name} {m['auroc']['value']:.3f} [{m['auroc']['ci_low']:.3f}, {m['auroc']['ci_high']:.3f}]"
            for name, m in only["methods"].items()
            if m is not None
        ]
        rows.append(
            f"- {only['split']} labels alone ({only['labels']}, {only['positives']} positive; predictions.parquet holds "
            f"these only): AUROC " + ("; ".join(shown) if shown else "not defined (one class)")
        )
    rows.append(
        f"- histories: up to {result['history']['max_len']} tokens ({result['history']['mean_tokens']:.0f} on average), "
        f"{result['history'].get('truncated', 0)} left-truncated; pooling {result['history']['pooling']}"
    )
    if result.get("description"):
        rows.insert(0, f"- task: {result['description']}")
    sections = {"Data": "\n".join(rows)}
    ri = result.get("random_init_seeds")
    if ri and len(ri["auroc"]) > 1:
        sections["Pretrained vs random init"] = (
            f"- random init over {len(ri['auroc'])} seeds ({', '.join(map(str, ri['seeds']))}): AUROC {ri['auroc_mean']:.3f} ± {ri['auroc_sd']:.3f} "
            f"({', '.join(f'{a:.3f}' for a in ri['auroc'])})\n"
            f"- probe {ri['probe_auroc']:.3f}: {ri['probe_minus_mean']:+.3f} vs the mean; above {ri['probe_beats']} of {len(ri['auroc'])} seeds"
        )
    if result.get("paired"):
        lines = ["| comparison | AUROC difference [95% CI] | AUPRC difference [95% CI] |", "|---|---:|---:|"]
        for name, d in result["paired"].items():
            cells = [
                f"{d[m]['value']:+.3f} [{d[m]['ci_low']:+.3f}, {d[m]['ci_high']:+.3f}]" for m in ("auroc", "auprc")
            ]
            lines.append(f"| {name} | " + " | ".join(cells) + " |")
        sections["Paired differences (same subject-bootstrap draws)"] = "\n".join(lines)
    if result["few_shot"]:
        ks = [r["k"] for r in next(iter(result["few_shot"].values()))]
        lines = ["| method | " + " | ".join(f"k={k}" for k in ks) + " |", "|---|" + "---:|" * len(ks)]
        for name, curve in result["few_shot"].items():
            lines.append(
                f"| {name} | "
                + " | ".join(
                    f"{r['auroc']:.3f} ± {r['auroc_sd']:.3f}" if r["auroc_sd"] else f"{r['auroc']:.3f}" for r in curve
                )
                + " |"
            )
        sections["Few-shot (held-out AUROC, mean ± sd over repeats)"] = "\n".join(lines)
    return sections


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
