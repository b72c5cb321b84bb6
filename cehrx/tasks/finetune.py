"""`cehrx task=finetune`: train the pretrained model on a labelled task, beside the probe and counts.

    cehrx task=finetune model_dir=runs/site/model probe.task=synthea20k_death_1y
    cehrx task=finetune model_dir=... probe.task=... finetune.method=lora finetune.lora.rank=8
    cehrx task=finetune model_dir=... probe.task=... finetune.few_shot=[64,256,1024]

The labels, histories and readout are the probe's (`probe.task` / `labels_dir`, `probe.max_len`,
`probe.pooling`, `probe.train_label_fraction`: `cehrx.probe.cohort`). Per training budget k: the
model learns from k train-split labels (stratified sample; `all` = every one), early-stops on the
tuning split's AUROC and keeps its best epoch, then scores held_out. The linear probe and the count
baselines are fit on the same k labels plus the tuning split (the labels fine-tuning saw) and scored
on the same held-out rows, so every comparison is paired.

Output (`output_dir`, appears when complete; `<output_dir>/work` holds checkpoints while it runs and a
rerun resumes there, budget by budget and from the last epoch):

    predictions.parquet            the fine-tuned model at the largest budget (meds-evaluation schema)
    predictions/<method>_k<k>.parquet   every method and budget
    metrics.json                   metrics with 95 % CIs and paired differences per budget
    report.md, roc.png, calibration.png
    checkpoints/best.ckpt          the fine-tuned weights at the largest budget (Lightning checkpoint)
    logs/k<k>.csv                  each budget's training log (train_loss per step; val_loss, val_auroc per epoch)
    config.yaml
"""

from __future__ import annotations

import logging
import sys
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
from omegaconf import DictConfig

from cehrx.data.atomic import link_or_copy
from cehrx.data.hashing import unit_hash
from cehrx.errors import CehrxError
from cehrx.eval.metrics import binary_metrics, format_ci, paired_difference
from cehrx.eval.predictions import write_predictions
from cehrx.eval.report import write_report
from cehrx.finetune.model import METHODS
from cehrx.finetune.train import BudgetResult, train_budget
from cehrx.model.export import load_pretrained
from cehrx.model.export import model_dir as resolve_model_dir
from cehrx.probe import labels as L
from cehrx.probe.classifier import fit_predict
from cehrx.probe.cohort import Cohort, build_cohort
from cehrx.probe.counts import baseline_features
from cehrx.probe.evaluate import stratified_sample
from cehrx.probe.feature_cache import Embedder, weights_sha256
from cehrx.tasks.inputs import prepared_dir_for
from cehrx.tasks.scaffold import guard, task_output, write_marker

log = logging.getLogger("cehrx.finetune")
BASELINES = ("probe", "counts")
WORK = "work"


def run(cfg: DictConfig) -> dict[str, Any]:
    f = cfg.finetune
    if str(f.method) not in METHODS:
        raise CehrxError(f"finetune.method must be one of {METHODS}, got {f.method!r}")
    bad = [b for b in (f.baselines or []) if b not in BASELINES]
    if bad:
        raise CehrxError(f"finetune.baselines: unknown {bad} (choose from {list(BASELINES)})")
    mdir = resolve_model_dir(cfg.model_dir)
    prepared = prepared_dir_for(cfg, mdir)
    out = Path(str(cfg.output_dir))
    guard("finetune", out, bool(cfg.overwrite))
    table, source = L.read_labels(cfg, prepared)
    model, vocab = load_pretrained(mdir)
    max_len = int(cfg.probe.max_len or model.config.max_seq_len)
    if max_len > model.config.max_seq_len:
        raise CehrxError(f"probe.max_len={max_len} exceeds the model's max_seq_len={model.config.max_seq_len}")
    test_split = str(cfg.get("split") or "held_out")
    cohort = build_cohort(cfg.probe, prepared, vocab, table, max_len, test_split)
    rows = select_rows(cohort, f, int(f.seed), test_split)
    features = baseline_inputs(cfg, mdir, prepared, model, len(vocab), cohort, rows, max_len)
    work = out / WORK
    results = {}
    for k in budgets(f.few_shot, len(rows["train"])):
        train_k = budget_rows(cohort.y, rows["train"], k, int(f.seed))
        head = features.get("probe_head")
        results[k] = (
            train_budget(
                cfg,
                model,
                cohort,
                train_k,
                rows,
                work / f"k{k}",
                head_from(head, cohort.y, train_k, cohort.sid, int(f.seed)),
            ),
            fit_baselines(features, cohort, train_k, rows, int(f.seed)),
        )
    with task_output(cfg, "finetune") as tmp:
        result = write_outputs(cfg, tmp, source, mdir, prepared, cohort, rows, results, work)
        write_marker(tmp, "finetune", result)
    _print_summary(result, out)
    return result


def select_rows(cohort: Cohort, f, seed: int, test_split: str = "held_out") -> dict[str, np.ndarray]:
    """Row indices per role: `train` (gradients), `tuning` (early stopping), `test` (scored).

    The test split is held_out (or MEDS-DEV's `split=tuning`: then early stopping uses a fixed 15 % of
    the train subjects, by a hash of the subject id). `finetune.max_tuning_labels` / `max_test_labels`
    take a seeded uniform subsample (every forward pass over held_out costs as much as an epoch on as
    many labels); the baselines use the same rows.
    """
    if test_split not in ("held_out", "tuning"):
        raise CehrxError(f"finetune scores split=held_out or split=tuning, got split={test_split!r}")
    rng = np.random.default_rng(seed)
    train = np.flatnonzero(cohort.split == "train")
    if test_split == "tuning":
        stop = unit_hash(cohort.sid[train], np.full(len(train), seed)) < 0.15
        rows = {"train": train[~stop], "tuning": train[stop], "test": np.flatnonzero(cohort.split == "tuning")}
    else:
        rows = {
            "train": train,
            "tuning": np.flatnonzero(cohort.split == "tuning"),
            "test": np.flatnonzero(cohort.split == "held_out"),
        }
    for role, cap in (("tuning", f.get("max_tuning_labels")), ("test", f.get("max_test_labels"))):
        if cap is not None and len(rows[role]) > int(cap):
            rows[role] = np.sort(rng.choice(rows[role], int(cap), replace=False))
    for role in ("train", "test"):
        y = cohort.y[rows[role]]
        if not len(y) or y.all() or not y.any():
            raise CehrxError(
                f"finetune needs {role} labels of both classes; the {role} rows have {int(y.sum())} positive and "
                f"{int((~y).sum())} negative (a larger labelled set, or probe with cross-fitting for small ones)"
            )
    return rows


def budgets(few_shot, n_train: int) -> list[str]:
    """Training budgets as names: `"64"`, ..., `"all"` (a k at or above the train labels is `all`)."""
    out = []
    for k in list(few_shot or ["all"]):
        name = "all" if str(k) == "all" or int(k) >= n_train else str(int(k))
        if name not in out:
            out.append(name)
    return out


def budget_rows(y: np.ndarray, train: np.ndarray, k: str, seed: int) -> np.ndarray:
    """The k training rows: the probe's stratified sample (at least one of each class), seeded by k."""
    if k == "all":
        return train
    return train[stratified_sample(y[train], int(k), np.random.default_rng(seed + int(k)))]


def baseline_inputs(
    cfg: DictConfig, mdir: Path, prepared: Path, model, vocab_size: int, cohort: Cohort, rows: dict, max_len: int
) -> dict[str, Any]:
    """Feature matrices of the baselines (`probe`: the frozen model's readout, read from the probe's
    feature store when `probe.cache_dir` is set; `counts`), for the rows this run uses."""
    f = cfg.finetune
    used = np.sort(np.concatenate(list(rows.values())))
    feats: dict[str, Any] = {}
    if "probe" in (f.baselines or []) or str(f.head_init) == "probe":
        X = np.zeros((len(cohort), model.config.n_embd), dtype=np.float32)
        X[used] = Embedder(cfg.probe, cohort.hist.take(used), cohort.sid[used], prepared, max_len)(
            model, {"model_sha256": weights_sha256(mdir)}
        )
        feats["probe_head"] = X
        if "probe" in (f.baselines or []):
            feats["probe"] = X
    if "counts" in (f.baselines or []):
        select = np.concatenate([rows["train"], rows["tuning"]])
        counts, _ = baseline_features(
            ["counts"],
            prepared,
            cohort.labels.take(pa.array(used)),
            cohort.hist.take(used),
            vocab_size,
            np.flatnonzero(np.isin(used, select)),
            int(cfg.probe.min_code_labels),
        )
        full = counts["counts"].tocsr()
        pos = np.full(len(cohort), -1)
        pos[used] = np.arange(len(used))
        feats["counts"] = (full, pos)  # rows of `full` by cohort row: full[pos[r]]
    return feats


def _rows(X, r: np.ndarray):
    return X[0][X[1][r]] if isinstance(X, tuple) else X[r]


def head_from(X, y: np.ndarray, train_k: np.ndarray, sid: np.ndarray, seed: int) -> tuple[np.ndarray, float] | None:
    """The linear probe on the k training rows, as the head's (weight, bias) on the raw readout."""
    if X is None:
        return None
    from cehrx.probe.classifier import fit_logistic

    pipe = fit_logistic(X[train_k], y[train_k], seed, sid[train_k])
    scaler, clf = pipe[0], pipe[-1]
    scale = np.where(scaler.scale_ > 0, scaler.scale_, 1.0)
    w = clf.coef_.ravel() / scale
    return w, float(clf.intercept_[0] - (w * scaler.mean_).sum())


def fit_baselines(features: dict, cohort: Cohort, train_k: np.ndarray, rows: dict, seed: int) -> dict[str, np.ndarray]:
    """Each baseline fit on the budget's rows plus tuning (the labels fine-tuning saw), scored on test."""
    fit_rows = np.concatenate([train_k, rows["tuning"]])
    out = {}
    for name in BASELINES:
        if name in features:
            X = features[name]
            out[name] = fit_predict(
                _rows(X, fit_rows), cohort.y[fit_rows], _rows(X, rows["test"]), seed=seed, groups=cohort.sid[fit_rows]
            )
    return out


def write_outputs(
    cfg: DictConfig,
    tmp: Path,
    source: dict,
    mdir: Path,
    prepared: Path,
    cohort: Cohort,
    rows: dict,
    results: dict[str, tuple[BudgetResult, dict]],
    work: Path,
) -> dict[str, Any]:
    test = rows["test"]
    y, sid = cohort.y[test], cohort.sid[test]
    times = cohort.labels.take(pa.array(test)).column("prediction_time")
    n_boot, seed = int(cfg.finetune.n_boot), int(cfg.finetune.seed)
    by_budget, curves, rows_table = {}, {}, {}
    last = list(results)[-1]
    for k, (ft, base) in results.items():
        probs = {"finetune": ft.probs, **base}
        metrics = {name: binary_metrics(y, p, sid, n_boot=n_boot, seed=seed) for name, p in probs.items()}
        paired = {f"finetune - {b}": paired_difference(y, sid, ft.probs, [p], n_boot, seed) for b, p in base.items()}
        by_budget[k] = {"n_train": len(ft.train_rows), "finetune": ft.info, "methods": metrics, "paired": paired}
        log_csv = work / f"k{k}" / "metrics.csv"
        if log_csv.is_file():  # the training curve (loss per step, tuning AUROC per epoch) outlives the work dir
            (tmp / "logs").mkdir(exist_ok=True)
            link_or_copy(log_csv, tmp / "logs" / f"k{k}.csv")
        for name, p in probs.items():
            write_predictions(tmp / "predictions" / f"{name}_k{k}.parquet", sid, times, y, p)
        if k == last:
            write_predictions(tmp / "predictions.parquet", sid, times, y, ft.probs)
            curves = {name: (y, p) for name, p in probs.items()}
            rows_table = metrics
            (tmp / "checkpoints").mkdir()
            link_or_copy(ft.best_ckpt, tmp / "checkpoints" / "best.ckpt")
    result = {
        **source,
        "model_dir": str(mdir),
        "prepared_dir": str(prepared),
        "method": str(cfg.finetune.method),
        "labels": label_counts(cohort, rows),
        "budgets": by_budget,
    }
    pq.write_table(
        cohort.labels_with_split().take(pa.array(np.sort(np.concatenate(list(rows.values()))))), tmp / "labels.parquet"
    )
    title = f"Fine-tuning ({cfg.finetune.method}): {source.get('task') or source.get('labels_dir')}, k={last}"
    write_report(tmp, title, rows_table, curves, sections=report_sections(result))
    return result


def label_counts(cohort: Cohort, rows: dict) -> dict:
    return {
        "in": cohort.n_in,
        "kept": len(cohort),
        "thinned": cohort.thinned,
        **{
            role: {"n": len(r), "n_pos": int(cohort.y[r].sum()), "subjects": len(np.unique(cohort.sid[r]))}
            for role, r in rows.items()
        },
    }


def report_sections(result: dict) -> dict[str, str]:
    lab = result["labels"]
    data = [
        f"- {role}: {lab[role]['n']} labels ({lab[role]['n_pos']} positive), {lab[role]['subjects']} subjects"
        for role in ("train", "tuning", "test")
    ]
    lines = ["| k | method | AUROC [95% CI] | vs fine-tune: AUROC difference [95% CI] |", "|---|---|---:|---:|"]
    for k, b in result["budgets"].items():
        for name, m in b["methods"].items():
            d = b["paired"].get(f"finetune - {name}")
            diff = format_ci(d["auroc"], signed=True) if d else ""
            lines.append(f"| {k} | {name} | {format_ci(m['auroc'])} | {diff} |")
    train = [
        "| k | epochs | best epoch (step) | tuning AUROC | trainable parameters | seconds |",
        "|---|---:|---:|---:|---:|---:|",
    ]
    for k, b in result["budgets"].items():
        i = b["finetune"]
        train.append(
            f"| {k} | {i['epochs_run']} | {i['best_epoch']} ({i.get('best_step', '?')}) | {i['best_val']:.3f} "
            f"| {i['parameters']['trainable']:,} "
            f"({100 * i['parameters']['trainable_fraction']:.2f} %) | {i['seconds']:.0f} |"
        )
    return {
        "Data": "\n".join(data),
        "Per budget (finetune - method: paired, same subject-bootstrap draws)": "\n".join(lines),
        "Training": "\n".join(train),
    }


def _print_summary(result: dict, out: Path) -> None:
    parts = []
    for k, b in result["budgets"].items():
        parts.append(f"k={k}: " + ", ".join(f"{n} {m['auroc']['value']:.3f}" for n, m in b["methods"].items()))
    print(f"finetune ({result['method']}): " + "; ".join(parts) + f" -> {out}", file=sys.stderr)
