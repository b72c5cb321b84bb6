"""`task=probe` end to end: a tiny MEDS data set -> prepare -> micro model (20 steps) -> probe."""

from __future__ import annotations

import datetime as dt
import json
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from cehrx.errors import CehrxError
from cehrx.eval.predictions import read_predictions
from tests.conftest import QUIET, compose_cfg

NSAID, BLEED, RISK = "RxNorm/140587", "SNOMED/74474003", "SNOMED/13200003"
FAST_PROBE = (
    "probe.n_boot=50",
    "probe.few_shot=[16,all]",
    "probe.few_shot_repeats=1",
    "probe.progress=false",
    "probe.min_code_labels=2",
)


def write_meds_fixture(root: Path, n: int = 160, seed: int = 0) -> Path:
    """Subjects with day visits of common codes; most start an NSAID; a GI bleed follows within a
    year far more often when a peptic ulcer (the risk code) came before the NSAID."""
    rng = np.random.default_rng(seed)
    rows: list[tuple] = []
    for s in range(1, n + 1):
        birth = dt.datetime(1940 + int(rng.integers(0, 40)), 1 + int(rng.integers(0, 12)), 1)
        rows += [(s, None, "GENDER//" + ("F" if rng.random() < 0.5 else "M")), (s, birth, "MEDS_BIRTH")]
        t = dt.datetime(2000, 1, 1) + dt.timedelta(days=int(rng.integers(0, 700)))
        risky = rng.random() < 0.4
        nsaid_visit = int(rng.integers(3, 8)) if rng.random() < 0.85 else -1
        for v in range(int(rng.integers(6, 12))):
            t += dt.timedelta(days=int(rng.integers(20, 120)), hours=int(rng.integers(0, 5)))
            rows += [(s, t, f"LOINC/{int(c)}") for c in rng.integers(1, 12, int(rng.integers(2, 6)))]
            if risky and v == 1:
                rows.append((s, t, RISK))
            if v == nsaid_visit:
                rows.append((s, t, NSAID))
                if rng.random() < (0.7 if risky else 0.1):
                    rows.append((s, t + dt.timedelta(days=int(rng.integers(10, 300))), BLEED))
    d = root / "data" / "train"
    d.mkdir(parents=True, exist_ok=True)
    rows.sort(key=lambda r: (r[0], r[1] or dt.datetime.min))
    pq.write_table(
        pa.table(
            {
                "subject_id": pa.array([r[0] for r in rows], pa.int64()),
                "time": pa.array([r[1] for r in rows], pa.timestamp("us")),
                "code": pa.array([r[2] for r in rows], pa.string()),
                "numeric_value": pa.array([None] * len(rows), pa.float32()),
            }
        ),
        d / "0.parquet",
    )
    meta = root / "metadata"
    meta.mkdir(exist_ok=True)
    split = np.where(
        np.arange(1, n + 1) % 10 < 6, "train", np.where(np.arange(1, n + 1) % 10 < 7, "tuning", "held_out")
    )
    pq.write_table(
        pa.table({"subject_id": pa.array(np.arange(1, n + 1), pa.int64()), "split": split.tolist()}),
        meta / "subject_splits.parquet",
    )
    codes = sorted({r[2] for r in rows})
    pq.write_table(
        pa.table(
            {
                "code": codes,
                "description": [None] * len(codes),
                "parent_codes": pa.array([[]] * len(codes), pa.list_(pa.string())),
            }
        ),
        meta / "codes.parquet",
    )
    return root


@pytest.fixture(scope="module")
def micro_model(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    """(prepared dir, pretrain output dir) of a micro model trained 20 steps on the fixture."""
    from cehrx.tasks.prepare import run as prepare
    from cehrx.tasks.pretrain import run as pretrain

    root = tmp_path_factory.mktemp("probe_e2e")
    meds = write_meds_fixture(root / "meds_src")
    prepared = root / "prepared"
    prepare(
        compose_cfg(
            "task=prepare",
            "data=meds",
            f"data.path={meds}",
            f"output_dir={prepared}",
            "task.min_subjects=2",
            "task.duckdb.threads=1",
        )
    )
    model = root / "pretrain"
    pretrain(
        compose_cfg(
            "task=pretrain",
            "trainer=cpu",
            "model=micro",
            "model.max_seq_len=128",
            f"data.prepared_dir={prepared}",
            f"output_dir={model}",
            "trainer.max_steps=20",
            "task.datamodule.max_tokens_per_batch=1024",
            "logger=none",
            "callbacks=none",
            *QUIET,
        )
    )
    return prepared, model


@pytest.mark.slow
def test_probe_task_end_to_end(micro_model: tuple[Path, Path], tmp_path: Path) -> None:
    from cehrx.tasks.probe import run

    prepared, model = micro_model
    out = tmp_path / "probe"
    result = run(
        compose_cfg(
            "task=probe",
            f"model_dir={model}",
            "probe.task=gibleed_after_nsaid",
            f"output_dir={out}",
            "probe.random_init=true",
            "probe.random_init_seeds=2",
            *FAST_PROBE,
        )
    )
    assert result["labels"]["used"] > 100 and 20 < result["labels"]["positives"] < result["labels"]["used"] - 20
    assert result["evaluation"] == "split" and result["prepared_dir"] == str(prepared)
    held = result["labels"]["by_split"]["held_out"]  # held-out scoring: no subject the model was pretrained on
    assert result["scored"]["labels"] == held["n"] and result["scored"]["pretraining_labels"] == 0
    assert set(result["methods"]) == {"probe", "random_init", "random_init_2", "counts", "counts_hgb"}
    ri = result["random_init_seeds"]  # two random models with different weights, summarised against the probe
    assert ri["methods"] == ["random_init", "random_init_2"] and ri["seeds"][1] == ri["seeds"][0] + 1
    assert ri["auroc"][0] != ri["auroc"][1] and ri["auroc_mean"] == pytest.approx(np.mean(ri["auroc"]), abs=1e-4)
    m = result["methods"]["counts"]
    assert (
        m["n"] == result["labels"]["by_split"]["held_out"]["n"] and m["auroc"]["value"] > 0.7
    )  # the planted risk code
    for name in ("probe", "random_init", "counts"):
        assert [r["k"] for r in result["few_shot"][name]] == [16, "all"]
    saved = json.loads((out / "metrics.json").read_text())
    assert saved["methods"]["probe"]["auroc"]["ci_low"] <= saved["methods"]["probe"]["auroc"]["value"]
    preds = read_predictions(out / "predictions.parquet")  # validated against meds-evaluation
    assert preds.num_rows == m["n"] and (out / "predictions" / "counts_hgb.parquet").is_file()
    feats = pq.read_table(out / "features.parquet")
    assert feats.num_rows == result["labels"]["used"] and pa.types.is_fixed_size_list(
        feats.schema.field("embedding").type
    )
    assert feats.schema.field("embedding").type.list_size == 64  # micro n_embd
    report = (out / "report.md").read_text()
    assert (
        "| probe |" in report
        and "| counts_hgb |" in report
        and "Few-shot" in report
        and "random init over 2 seeds" in report
        and (out / "roc.png").is_file()
    )
    with pytest.raises(CehrxError, match="overwrite=true"):
        run(
            compose_cfg(
                "task=probe", f"model_dir={model}", "probe.task=gibleed_after_nsaid", f"output_dir={out}", *FAST_PROBE
            )
        )

    # The same labels from a labels_dir give the same probe predictions (deterministic pipeline).
    labels_dir = tmp_path / "labels"
    labels_dir.mkdir()
    pq.write_table(pq.read_table(out / "labels.parquet").drop(["split"]), labels_dir / "0.parquet")
    out2 = tmp_path / "probe2"
    run(
        compose_cfg(
            "task=probe",
            f"model_dir={model / 'model'}",
            f"labels_dir={labels_dir}",
            f"output_dir={out2}",
            "probe.baselines=[]",
            *FAST_PROBE,
        )
    )
    again = read_predictions(out2 / "predictions.parquet")
    assert np.allclose(
        again.column("predicted_boolean_probability").to_numpy(),
        preds.column("predicted_boolean_probability").to_numpy(),
        atol=1e-6,
    )


@pytest.mark.slow
def test_probe_with_a_feature_store_and_thinned_training_labels(micro_model: tuple[Path, Path], tmp_path: Path) -> None:
    """Two readouts, one forward pass per model: the second run finds every history in the store and
    gives what an uncached run gives; thinning drops training labels only."""
    from cehrx.tasks.probe import run

    _, model = micro_model
    common = (
        f"model_dir={model}",
        "probe.task=gibleed_after_nsaid",
        "probe.random_init=true",
        "probe.random_init_seeds=1",
        f"probe.cache_dir={tmp_path / 'store'}",
        "probe.train_label_fraction=0.5",
        "probe.baselines=[counts,counts_window]",
        *FAST_PROBE,
    )
    last = run(compose_cfg("task=probe", *common, f"output_dir={tmp_path / 'last'}"))
    assert last["feature_cache"]["found"] == 0 and last["feature_cache"]["histories"] == 2 * last["labels"]["used"]
    assert {"counts", "counts_window"} <= set(last["methods"]) and "probe - counts_window" in last["paired"]
    thinned = last["labels"]["thinned"]
    assert thinned["train_label_fraction"] == 0.5 and thinned["dropped"] > 20
    full = run(
        compose_cfg(
            "task=probe",
            f"model_dir={model}",
            "probe.task=gibleed_after_nsaid",
            "probe.baselines=[]",
            *FAST_PROBE,
            f"output_dir={tmp_path / 'full'}",
        )
    )
    assert last["labels"]["by_split"]["held_out"] == full["labels"]["by_split"]["held_out"], (
        "the test split is never thinned"
    )
    assert last["labels"]["in"] == full["labels"]["in"]
    assert last["paired"]["probe - random_init"]["n_controls"] == 1 and "probe - counts" in last["paired"]
    mean = run(compose_cfg("task=probe", *common, "probe.pooling=mean", f"output_dir={tmp_path / 'mean'}"))
    assert mean["feature_cache"]["found"] == mean["feature_cache"]["histories"], (
        "the mean readout was stored by the first run"
    )
    plain = run(
        compose_cfg(
            "task=probe",
            f"model_dir={model}",
            "probe.task=gibleed_after_nsaid",
            "probe.train_label_fraction=0.5",
            "probe.baselines=[]",
            "probe.pooling=mean",
            *FAST_PROBE,
            f"output_dir={tmp_path / 'plain'}",
        )
    )
    a = pq.read_table(tmp_path / "mean" / "features.parquet").column("embedding").to_numpy(zero_copy_only=False)
    b = pq.read_table(tmp_path / "plain" / "features.parquet").column("embedding").to_numpy(zero_copy_only=False)
    np.testing.assert_allclose(np.stack(a), np.stack(b), atol=1e-5)
    assert plain["feature_cache"] is None
    assert "Paired differences" in (tmp_path / "last" / "report.md").read_text()


@pytest.mark.slow
def test_probe_needs_labels(micro_model: tuple[Path, Path], synthetic_prepared: Path, tmp_path: Path) -> None:
    from cehrx.model.export import model_dir
    from cehrx.tasks.inputs import prepared_dir_for
    from cehrx.tasks.probe import run

    prepared, model = micro_model
    # another prepared dir (e.g. the default runs/eunomia) is not fed to this model: its own is used
    assert (
        prepared_dir_for(
            compose_cfg("task=probe", f"data.prepared_dir={synthetic_prepared}", f"model_dir={model}"), model_dir(model)
        )
        == prepared
    )
    with pytest.raises(CehrxError, match="no labels"):
        run(compose_cfg("task=probe", f"model_dir={model}", f"output_dir={tmp_path / 'o'}"))
    with pytest.raises(CehrxError, match="unknown task"):
        run(compose_cfg("task=probe", f"model_dir={model}", "probe.task=nope", f"output_dir={tmp_path / 'o'}"))
    with pytest.raises(CehrxError, match="exceeds the model's max_seq_len"):
        run(
            compose_cfg(
                "task=probe",
                f"model_dir={model}",
                "probe.task=gibleed_after_nsaid",
                "probe.max_len=4096",
                f"output_dir={tmp_path / 'o'}",
            )
        )
    with pytest.raises(CehrxError, match="random_init_seeds must be >= 1"):
        run(
            compose_cfg(
                "task=probe",
                f"model_dir={model}",
                "probe.random_init=true",
                "probe.random_init_seeds=0",
                f"output_dir={tmp_path / 'o'}",
            )
        )
