"""`task=zeroshot` end to end through the real Hydra configs: a micro model pretrained a few
steps on the synthetic prepared dir, labels from a MEDS label file, outcome from an ACES config."""

from __future__ import annotations

import json
from collections.abc import Callable
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

import cehrx.zeroshot.predict as zp
from cehrx.data.history import load_all_splits
from cehrx.errors import CehrxError
from cehrx.eval.predictions import read_predictions
from cehrx.tasks.zeroshot import run
from tests.conftest import compose_cfg, pretrain_micro

pytestmark = pytest.mark.slow

ACES = """
predicates:
  visit: {code: "VISIT//OP"}
  outcome: {code: {any: ["SNOMED/101", "SNOMED/102"]}}
trigger: visit
windows:
  input: {start: null, end: trigger, start_inclusive: true, end_inclusive: true, index_timestamp: end}
  target: {start: input.end, end: start + 180d, start_inclusive: false, end_inclusive: true, label: outcome}
"""


@pytest.fixture(scope="module")
def trained(synthetic_prepared: Path, tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    """(model output dir, prepared dir): micro, 8 steps."""
    out = tmp_path_factory.mktemp("zs") / "model"
    steps = ("trainer.max_steps=8", "trainer.val_check_interval=8", "task.datamodule.max_tokens_per_batch=1024")
    pretrain_micro(synthetic_prepared, out, "model.max_seq_len=128", *steps)
    return out, synthetic_prepared


@pytest.fixture(scope="module")
def task_files(trained: tuple[Path, Path], tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    """(ACES yaml, labels dir): a label in the middle of every subject's record, outcome read off the data."""
    _, prepared = trained
    d = tmp_path_factory.mktemp("task")
    (d / "task.yaml").write_text(ACES)
    arrays, _ = load_all_splits(prepared)
    mid = arrays.offsets[:-1] + arrays.lengths() // 2
    t = arrays.times[mid]
    labels = pa.table(
        {
            "subject_id": pa.array(arrays.subject_id),
            "prediction_time": pa.array(t.astype("datetime64[s]").astype("datetime64[us]")),
            "boolean_value": pa.array(np.arange(len(t)) % 3 == 0),
        }
    )
    (d / "labels").mkdir()
    pq.write_table(labels, d / "labels" / "part-0.parquet")
    return d / "task.yaml", d / "labels"


def cfg_for(trained: tuple[Path, Path], task_files: tuple[Path, Path], out: Path, *overrides: str):
    model, _ = trained
    task, labels = task_files
    return compose_cfg(
        "task=zeroshot",
        f"model_dir={model}",
        f"probe.task={task}",
        f"labels_dir={labels}",
        f"output_dir={out}",
        "split=all",
        "zeroshot.num_samples=3",
        "sampling.max_new_tokens=32",
        "sampling.batch_size=64",
        "zeroshot.n_boot=50",
        "zeroshot.progress=false",
        *overrides,
    )


def test_end_to_end_outputs(trained, task_files, tmp_path: Path) -> None:
    out = tmp_path / "zs"
    metrics = run(cfg_for(trained, task_files, out, "zeroshot.write_trajectories=true"))
    assert {p.name for p in out.iterdir()} >= {
        "predictions.parquet",
        "details.parquet",
        "metrics.json",
        "report.md",
        "roc.png",
        "calibration.png",
        "config.yaml",
        "chunks",
        "trajectories",
    }
    preds = read_predictions(out / "predictions.parquet")  # meds-evaluation schema
    assert len(preds) == metrics["n"] == 66
    p = preds.column("predicted_boolean_probability").to_numpy()
    assert ((p >= 0) & (p <= 1)).all()
    saved = json.loads((out / "metrics.json").read_text())
    assert saved["outcome"]["window"]["end_days"] == 180 and sorted(saved["outcome"]["tokens"]) == [
        "SNOMED/101",
        "SNOMED/102",
    ]
    assert saved["futures"]["futures"] == 3 * 66 and 0 < saved["futures"]["resolved_share"] <= 1
    report = (out / "report.md").read_text()
    assert (
        "| zero-shot (3 futures, mc) |" in report
        and "| zero-shot (3 futures, hazard) |" in report
        and "hazard - mc AUROC" in report
    )
    est = saved["estimators"]  # both estimators from the same futures, and their paired difference
    assert saved["estimator"] == "hazard", "the hazard sum is the default prediction"
    assert est["hazard"]["auroc"]["value"] == saved["auroc"]["value"] and "value" in est["hazard - mc"]["auroc"]
    assert est["hazard"]["mean_label_se"] < est["mc"]["mean_label_se"], "the hazard sum is the less noisy estimate"
    det = pq.read_table(out / "details.parquet")
    h = det.column("hazard_probability").to_numpy()
    assert ((h >= 0) & (h <= 1 + 1e-6)).all() and (det.column("hazard_se").to_numpy() >= 0).all()
    cif = np.stack(det.column("hazard_cif").to_pylist())
    assert (
        cif.shape == (66, 10) and (np.diff(cif, axis=1) >= -1e-12).all() and np.allclose(cif[:, -1], h)
    )  # rises to the risk at the window's end
    traj = sorted((out / "trajectories").glob("*.parquet"))
    assert [t.stem for t in traj] == ["0", "1", "2"]  # one MEDS file per sample index
    t0 = pq.read_table(traj[0])
    assert t0.column_names == ["subject_id", "prediction_time", "time", "code", "numeric_value"] and t0.num_rows > 0
    with pytest.raises(CehrxError, match="overwrite=true"):
        run(cfg_for(trained, task_files, out))


def test_each_estimator_is_the_prediction_when_chosen(trained, task_files, tmp_path: Path) -> None:
    m = run(cfg_for(trained, task_files, tmp_path / "mc", "zeroshot.estimator=mc"))
    assert m["estimator"] == "mc" and m["auroc"]["value"] == m["estimators"]["mc"]["auroc"]["value"]
    det = pq.read_table(tmp_path / "mc" / "details.parquet")
    res, p = det.column("n_resolved").to_numpy(), det.column("probability").to_numpy()
    np.testing.assert_allclose(p[res > 0], det.column("n_outcome").to_numpy()[res > 0] / res[res > 0])
    with pytest.raises(CehrxError, match="top_k=0"):
        run(cfg_for(trained, task_files, tmp_path / "hz2", "sampling.top_k=5", "zeroshot.estimator=hazard"))
    topk = run(cfg_for(trained, task_files, tmp_path / "topk", "sampling.top_k=5"))  # auto falls back to mc
    assert topk["estimator"] == "mc" and "estimators" not in topk  # Monte Carlo alone still runs


def test_reach_end_to_end_is_its_own_run_and_reproducible(trained, task_files, tmp_path: Path) -> None:
    """`zeroshot.estimator=reach`: futures of its own (outcome forbidden in the window), REACH is the prediction."""
    a = run(cfg_for(trained, task_files, tmp_path / "r1", "zeroshot.estimator=reach"))
    assert a["estimator"] == "reach" and "estimators" not in a, "mc and hazard are not read off REACH's futures"
    assert a["reach"]["mean_label_se"] is not None and a["reach"]["note"]
    assert a["zeroshot"]["estimator"] == "reach" and a["n"] == 66
    det = pq.read_table(tmp_path / "r1" / "details.parquet")
    r, p = det.column("reach_probability").to_numpy(), det.column("probability").to_numpy()
    ok = np.isfinite(r)
    assert ok.any() and ((r[ok] >= 0) & (r[ok] <= 1)).all() and np.allclose(p[ok], r[ok])
    se = det.column("reach_se").to_numpy()[ok]  # NaN where a label has a single future to read
    assert np.isfinite(se).any() and (se[np.isfinite(se)] >= 0).all()
    cif = np.stack(det.column("reach_cif").to_pylist())[ok]
    assert (np.diff(cif, axis=1) >= -1e-12).all() and np.allclose(cif[:, -1], r[ok])
    assert "with_outcome_share" not in a["futures"], "no REACH future holds the outcome inside its window"
    assert "reach" in (tmp_path / "r1" / "report.md").read_text()
    b = run(cfg_for(trained, task_files, tmp_path / "r2", "zeroshot.estimator=reach"))
    same = pq.read_table(tmp_path / "r2" / "details.parquet").column("reach_probability").to_numpy()
    np.testing.assert_array_equal(r, same)  # the same seed, the same futures and estimate
    assert b["auroc"]["value"] == a["auroc"]["value"]


def test_hazard_cv_end_to_end_reads_the_same_futures_as_mc_and_hazard(trained, task_files, tmp_path: Path) -> None:
    """`zeroshot.estimator=hazard_cv`: the same futures as a hazard run (mc and hazard identical, compared
    beside it), its own probabilities in [0, 1] with standard errors, the paired difference in the report;
    its chunks are not resumed as a plain hazard run's (they hold the control sums)."""
    h = run(cfg_for(trained, task_files, tmp_path / "h", "zeroshot.estimator=hazard"))
    cv = run(cfg_for(trained, task_files, tmp_path / "cv", "zeroshot.estimator=hazard_cv"))
    assert cv["estimator"] == "hazard_cv" and cv["auroc"]["value"] == cv["estimators"]["hazard_cv"]["auroc"]["value"]
    for e in ("mc", "hazard"):  # recording the control expectations changes no future
        assert cv["estimators"][e]["auroc"]["value"] == h["estimators"][e]["auroc"]["value"]
    det = pq.read_table(tmp_path / "cv" / "details.parquet")
    p, se = det.column("hazard_cv_probability").to_numpy(), det.column("hazard_cv_se").to_numpy()
    ok = np.isfinite(p)
    assert ok.sum() > 30 and ((p[ok] >= 0) & (p[ok] <= 1)).all() and (se[np.isfinite(se)] >= 0).all()
    assert not any(c.startswith("cv_") for c in det.column_names)  # the fit's sums stay in chunks/
    assert "hazard_cv - hazard AUROC" in (tmp_path / "cv" / "report.md").read_text()
    assert "mean_label_se" in cv["estimators"]["hazard_cv"]


def test_recalibration_on_the_tuning_split_is_labelled_and_keeps_the_raw_probability(
    trained, task_files, tmp_path: Path
) -> None:
    m = run(cfg_for(trained, task_files, tmp_path / "rc", "zeroshot.recalibrate=true", "zeroshot.estimator=hazard"))
    r = m["recalibration"]
    assert (
        r["method"] == "platt on the tuning split"
        and r["n"] > 0
        and 0 < r["n_pos"] < r["n"]
        and "auroc" in r["uncalibrated"]
    )
    det = pq.read_table(tmp_path / "rc" / "details.parquet")
    raw, cal = det.column("probability_uncalibrated").to_numpy(), det.column("probability").to_numpy()
    assert (
        not np.allclose(raw, cal) and (np.argsort(raw, kind="stable") == np.argsort(cal, kind="stable")).mean() > 0.9
    )  # monotone map
    assert "recalibrated on tuning" in (tmp_path / "rc" / "report.md").read_text()
    assert (tmp_path / "rc" / "recalibration" / "chunks").is_dir()


def crash_after(n: int, real: Callable) -> Callable:
    """`real`, interrupted (KeyboardInterrupt) at its call n + 1; `.calls` counts the calls."""

    def crashing(*args, **kwargs):
        crashing.calls += 1
        if crashing.calls > n:
            raise KeyboardInterrupt
        return real(*args, **kwargs)

    crashing.calls = 0
    return crashing


def test_resume_after_interruption_gives_the_same_result(
    trained, task_files, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    full = run(cfg_for(trained, task_files, tmp_path / "full", "zeroshot.chunk_size=20"))
    real = zp.predict_chunk
    out = tmp_path / "resumed"
    monkeypatch.setattr(zp, "predict_chunk", crash_after(2, real))
    with pytest.raises(KeyboardInterrupt):
        run(cfg_for(trained, task_files, out, "zeroshot.chunk_size=20"))
    assert sorted(p.name for p in (out / "work" / "chunks").glob("*.parquet")) == ["0.parquet", "1.parquet"]
    monkeypatch.setattr(zp, "predict_chunk", real)
    with pytest.raises(CehrxError, match="different zero-shot run"):  # other settings never mix with these chunks
        run(cfg_for(trained, task_files, out, "zeroshot.chunk_size=20", "zeroshot.num_samples=4"))
    resumed = run(cfg_for(trained, task_files, out, "zeroshot.chunk_size=20"))
    assert resumed["run"]["resumed_chunks"] == 2
    a = pq.read_table(tmp_path / "full" / "predictions.parquet")
    b = pq.read_table(out / "predictions.parquet")
    assert a.equals(b)
    assert resumed["auroc"]["value"] == full["auroc"]["value"] or np.isnan(full["auroc"]["value"])
    assert not (out / "work").exists() and sorted(p.name for p in (out / "chunks").glob("*.parquet")) == [
        "0.parquet",
        "1.parquet",
        "2.parquet",
        "3.parquet",
    ]


def files(d: Path) -> dict[str, bytes]:
    return {p.relative_to(d).as_posix(): p.read_bytes() for p in sorted(d.rglob("*")) if p.is_file()}


def test_an_interrupted_overwrite_leaves_the_finished_output_whole(
    trained, task_files, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """overwrite=true works beside the finished output: interrupted, the old output (its chunks, the
    work a later run could resume from, included) is exactly as it was; rerun with the same settings
    (overwrite=true still), it resumes its own chunks; finished, the new one replaces it."""
    out = tmp_path / "ow"
    old = run(cfg_for(trained, task_files, out, "zeroshot.chunk_size=20"))
    before = files(out)
    real = zp.predict_chunk
    crashing = crash_after(1, real)
    monkeypatch.setattr(zp, "predict_chunk", crashing)
    new = ("zeroshot.chunk_size=20", "zeroshot.num_samples=4", "overwrite=true")
    with pytest.raises(KeyboardInterrupt):
        run(cfg_for(trained, task_files, out, *new))
    assert crashing.calls == 2, "the new run had made one chunk"
    after = {k: v for k, v in files(out).items() if not k.startswith("work/")}
    assert after == before, "an unfinished overwrite changed the finished output"
    monkeypatch.setattr(zp, "predict_chunk", real)
    replaced = run(cfg_for(trained, task_files, out, *new))
    assert replaced["run"]["resumed_chunks"] == 1, "the rerun with the same overwrite settings resumed the chunk made"
    assert replaced["zeroshot"]["num_samples"] == 4 != old["zeroshot"]["num_samples"]
    assert not (out / "work").exists() and len(list((out / "chunks").glob("*.parquet"))) == 4
    assert json.loads((out / "chunks" / "manifest.json").read_text()) != json.loads(before["chunks/manifest.json"])


def test_chunks_of_an_earlier_version_still_resume(trained, task_files, tmp_path: Path) -> None:
    """Before `work/`, an interrupted run kept its chunks in `output_dir/chunks`: they are adopted."""
    full = tmp_path / "full"
    run(cfg_for(trained, task_files, full, "zeroshot.chunk_size=20"))
    out = tmp_path / "earlier"
    (out / "chunks").mkdir(parents=True)
    for name in ("manifest.json", "0.parquet", "1.parquet"):
        (out / "chunks" / name).write_bytes((full / "chunks" / name).read_bytes())
    resumed = run(cfg_for(trained, task_files, out, "zeroshot.chunk_size=20"))
    assert resumed["run"]["resumed_chunks"] == 2
    assert pq.read_table(full / "predictions.parquet").equals(pq.read_table(out / "predictions.parquet"))


def test_config_composes_with_probe_task_key() -> None:
    cfg = compose_cfg("task=zeroshot", "probe.task=gibleed_after_nsaid", "zeroshot.num_samples=20")
    assert cfg.task.name == "zeroshot" and cfg.probe.task == "gibleed_after_nsaid" and cfg.zeroshot.num_samples == 20
    assert cfg.sampling.seed == cfg.seed and cfg.sampling.batch_size == 1024 and cfg.sampling.max_new_tokens == 256


def test_clear_errors(trained, task_files, tmp_path: Path) -> None:
    with pytest.raises(CehrxError, match="no exported model"):
        run(cfg_for(trained, task_files, tmp_path / "a", f"model_dir={tmp_path / 'nothing'}"))
    with pytest.raises(CehrxError, match="vocabulary|none of the codes"):
        run(cfg_for(trained, task_files, tmp_path / "b", "zeroshot.outcome_codes=[NOT/A_CODE]"))
    with pytest.raises(CehrxError, match="leaves"):
        run(cfg_for(trained, task_files, tmp_path / "c", "sampling.max_new_tokens=1000"))


def test_random_init_control_and_label_subsample(trained, task_files, tmp_path: Path) -> None:
    out = tmp_path / "rand"
    metrics = run(cfg_for(trained, task_files, out, "zeroshot.random_init=true", "zeroshot.max_labels=12"))
    assert metrics["run"]["random_init"] is True and metrics["n"] == 12
    assert "| zero-shot random-init (3 futures, mc) |" in (out / "report.md").read_text()
