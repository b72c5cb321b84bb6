"""Utility: is a classifier trained on synthetic patients as good as one trained on real ones?

TRTR (train on real, test on real) vs TSTR (train on synthetic, test on real), with probe's
count-based classifier (`cehrx.probe.counts.count_features` + `cehrx.probe.classifier.fit_predict`)
and labels from the same ACES task definitions run on each MEDS dataset. The test set is the
real non-member split (held-out); the real training rows are the real train split; the feature
columns are fixed by the real training rows, so a synthetic set is scored on the same features.
The ratio TSTR/TRTR AUROC is 1 when synthetic data is as useful as real data.
"""

from __future__ import annotations

import logging
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

from cehrx.errors import CehrxError

log = logging.getLogger("cehrx.evaluate")


def split_subjects(meds_dir: Path, split: str) -> np.ndarray:
    """Subject ids of one split from `metadata/subject_splits.parquet`."""
    path = Path(meds_dir) / "metadata" / "subject_splits.parquet"
    if not path.is_file():
        raise CehrxError(
            f"{path}: missing (a MEDS dataset needs metadata/subject_splits.parquet to know its {split} split)"
        )
    t = pq.read_table(path)
    return t.filter(pc.equal(t["split"], split)).column("subject_id").to_numpy().astype(np.int64)


def _rows_of(labels: pa.Table, subjects: np.ndarray) -> pa.Table:
    return labels.filter(pa.array(np.isin(labels.column("subject_id").to_numpy(), subjects)))


def _y(labels: pa.Table) -> np.ndarray:
    return labels.column("boolean_value").to_numpy(zero_copy_only=False).astype(bool)


def real_task_data(task: str, real_meds: Path, test_split: str, labels_cache_dir: str | Path | None = None) -> dict:
    """Real labels and count features for one task: train rows, test rows, feature vocabulary.

    With `labels_cache_dir` (the probe's `probe.labels_cache_dir`) the real labels are the ones probe and
    zeroshot already extracted: the same rows by construction, and no second ACES pass over every real
    event (18 s and 7.5 GB a task on Synthea 20k). Synthetic labels are never cached: each generate output
    is new.
    """
    from cehrx.probe.counts import count_features
    from cehrx.probe.labels import extract_labels

    labels = extract_labels(task, real_meds, cache_dir=labels_cache_dir)
    train = _rows_of(labels, split_subjects(real_meds, "train"))
    test = _rows_of(labels, split_subjects(real_meds, test_split))
    if len(train) == 0 or len(test) == 0:
        return {"skipped": f"no real labels (train {len(train)}, {test_split} {len(test)})"}
    X_train, vocab = count_features(real_meds, train)
    X_test, _ = count_features(real_meds, test, vocab[:-2])
    return {"train": train, "test": test, "X_train": X_train, "X_test": X_test, "vocab": vocab[:-2]}


def score(y: np.ndarray, p: np.ndarray, subjects: np.ndarray, n_boot: int, seed: int) -> dict:
    from cehrx.eval.metrics import binary_metrics

    m = binary_metrics(y, p, subjects, n_boot=n_boot, seed=seed)
    return {
        "auroc": m["auroc"]["value"],
        "auroc_ci": [m["auroc"]["ci_low"], m["auroc"]["ci_high"]],
        "auprc": m["auprc"]["value"],
        "n_test": m["n"],
        "n_test_pos": m["n_pos"],
    }


def evaluate_task(
    task: str, real: dict, synthetic_meds: dict[str, Path], classifier: str, n_boot: int, seed: int
) -> dict[str, dict]:
    """TRTR once, TSTR for each synthetic MEDS dir; returns per-set results for this task."""
    from cehrx.probe.classifier import fit_predict
    from cehrx.probe.counts import count_features
    from cehrx.probe.labels import extract_labels

    if "skipped" in real:
        return {name: {"skipped": real["skipped"]} for name in synthetic_meds}
    y_test, subj = _y(real["test"]), real["test"].column("subject_id").to_numpy()
    if y_test.all() or not y_test.any():
        return {name: {"skipped": f"one class in the real test labels ({len(y_test)} rows)"} for name in synthetic_meds}
    y_train = _y(real["train"])
    p = fit_predict(
        real["X_train"],
        y_train,
        real["X_test"],
        seed=seed,
        kind=classifier,
        groups=real["train"].column("subject_id").to_numpy(),
    )
    trtr = score(y_test, p, subj, n_boot, seed)
    out = {}
    for name, meds in synthetic_meds.items():
        labels = extract_labels(task, meds)
        y_syn = _y(labels)
        base = {
            "trtr_auroc": trtr["auroc"],
            "trtr_auroc_ci": trtr["auroc_ci"],
            "n_train_real": len(y_train),
            "n_train_real_pos": int(y_train.sum()),
            "n_train_synthetic": len(y_syn),
            "n_train_synthetic_pos": int(y_syn.sum()),
        }
        if len(y_syn) == 0 or y_syn.all() or not y_syn.any():
            out[name] = {**base, "skipped": f"synthetic labels have {len(y_syn)} rows, {int(y_syn.sum())} positive"}
            continue
        X_syn, _ = count_features(meds, labels, real["vocab"])
        p_syn = fit_predict(
            X_syn, y_syn, real["X_test"], seed=seed, kind=classifier, groups=labels.column("subject_id").to_numpy()
        )
        tstr = score(y_test, p_syn, subj, n_boot, seed)
        out[name] = {**base, **tstr, "ratio": tstr["auroc"] / trtr["auroc"] if trtr["auroc"] else float("nan")}
    return out


def utility(
    tasks: list[str],
    real_meds: Path,
    synthetic_meds: dict[str, Path],
    test_split: str = "held_out",
    classifier: str = "logistic",
    n_boot: int = 200,
    seed: int = 0,
    labels_cache_dir: str | Path | None = None,
) -> dict[str, dict]:
    """`{set name: {"tasks": {task: metrics}, "mean_ratio": float}}` over the given ACES tasks."""
    per_set: dict[str, dict] = {name: {"tasks": {}} for name in synthetic_meds}
    from cehrx.probe.labels import shipped_labels

    for task in tasks:
        log.info("utility: task %s", task)
        try:
            if (
                shipped_labels(task) is not None
            ):  # fixed label files of one real data set: nothing to extract on synthetic patients
                raise CehrxError(
                    f"task {task} ships fixed labels instead of an ACES definition; it cannot label synthetic patients"
                )
            real = real_task_data(task, real_meds, test_split, labels_cache_dir)
            results = evaluate_task(task, real, synthetic_meds, classifier, n_boot, seed)
        except CehrxError as e:
            results = {name: {"skipped": str(e)} for name in synthetic_meds}
        for name, r in results.items():
            per_set[name]["tasks"][task] = r
    for name, s in per_set.items():
        ratios = [r["ratio"] for r in s["tasks"].values() if np.isfinite(r.get("ratio", np.nan))]
        s["mean_ratio"] = float(np.mean(ratios)) if ratios else float("nan")
    return per_set
