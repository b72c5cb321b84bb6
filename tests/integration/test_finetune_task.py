"""`task=finetune` end to end on the probe tests' micro model: full, LoRA, resume after SIGKILL, no leakage."""

from __future__ import annotations

import json
import os
import shlex
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq
import pytest
import torch
from omegaconf import OmegaConf

from cehrx.errors import CehrxError
from cehrx.eval.predictions import read_predictions
from cehrx.probe.labels import extract_labels
from tests.conftest import REPO, compose_cfg
from tests.integration.test_probe_task import micro_model, write_meds_fixture  # noqa: F401 (fixture)

FAST = (
    "probe.task=gibleed_after_nsaid",
    "probe.progress=false",
    "probe.min_code_labels=2",
    "finetune.n_boot=50",
    "finetune.progress=false",
    "finetune.batch_tokens=2048",
)


def finetune_args(model: Path, out: Path, *overrides: str) -> list[str]:
    """The overrides of a fine-tuning run of the micro model, `FAST`."""
    return ["task=finetune", f"model_dir={model}", f"output_dir={out}", *overrides, *FAST]


@pytest.mark.slow
def test_finetune_full_end_to_end(micro_model: tuple[Path, Path], tmp_path: Path) -> None:
    from cehrx.tasks.finetune import run

    _, model = micro_model
    out = tmp_path / "ft"
    result = run(compose_cfg(*finetune_args(model, out, "finetune.few_shot=[16,all]", "finetune.epochs=3")))
    assert list(result["budgets"]) == ["16", "all"]
    for k, b in result["budgets"].items():
        assert set(b["methods"]) == {"finetune", "probe", "counts"}
        assert set(b["paired"]) == {"finetune - probe", "finetune - counts"}
        assert 1 <= b["finetune"]["epochs_run"] <= 3 and b["finetune"]["monitor"] == "val_auroc"
        assert b["finetune"]["parameters"]["trainable_fraction"] > 0.99  # full: every weight trains
    assert (
        result["budgets"]["16"]["n_train"] == 16
        and result["budgets"]["all"]["n_train"] == result["labels"]["train"]["n"]
    )
    n_test = result["labels"]["test"]["n"]
    preds = read_predictions(out / "predictions.parquet")  # meds-evaluation schema
    assert preds.num_rows == n_test and (out / "predictions" / "counts_k16.parquet").is_file()
    p = preds.column("predicted_boolean_probability").to_numpy()
    assert ((p >= 0) & (p <= 1)).all()
    assert result["budgets"]["all"]["methods"]["counts"]["auroc"]["value"] > 0.7  # the planted risk code is learnable
    assert (out / "checkpoints" / "best.ckpt").is_file() and not (out / "work").exists()
    report = (out / "report.md").read_text()
    assert "| all | finetune |" in report and (out / "roc.png").is_file()
    assert json.loads((out / "metrics.json").read_text())["method"] == "full"
    with pytest.raises(CehrxError, match="overwrite=true"):
        run(compose_cfg(*finetune_args(model, out)))


@pytest.mark.slow
def test_wise_ft_blend_is_chosen_on_tuning_and_alpha_zero_is_the_start(
    micro_model: tuple[Path, Path], tmp_path
) -> None:
    """`finetune.wise_alphas`: the blend with the best tuning AUROC is kept; `a = 0` gives back the LP-FT
    start exactly, so its predictions do not depend on how long the model trained."""
    from cehrx.tasks.finetune import run

    _, model = micro_model
    base = ("finetune.few_shot=[all]", "finetune.baselines=[]", "finetune.patience=10")
    r = run(
        compose_cfg(*finetune_args(model, tmp_path / "w", *base, "finetune.epochs=2", "finetune.wise_alphas=[0,0.5,1]"))
    )
    w = r["budgets"]["all"]["finetune"]["wise_ft"]
    assert w["alphas"] == [0.0, 0.5, 1.0] and len(w["tuning_auroc"]) == 3
    assert w["alpha"] == max(zip(w["tuning_auroc"], w["alphas"]))[1]
    probs = []
    for epochs in (1, 2):
        out = tmp_path / f"a0_{epochs}"
        run(compose_cfg(*finetune_args(model, out, *base, f"finetune.epochs={epochs}", "finetune.wise_alphas=[0]")))
        probs.append(read_predictions(out / "predictions.parquet").column("predicted_boolean_probability").to_numpy())
    np.testing.assert_allclose(probs[0], probs[1], rtol=1e-5, atol=1e-7)
    tuned = read_predictions(tmp_path / "w" / "predictions.parquet").column("predicted_boolean_probability").to_numpy()
    assert w["alpha"] == 0.0 or not np.allclose(tuned, probs[1])  # a blend that trained is not the start
    with pytest.raises(ValueError, match="each must lie in"):
        run(
            compose_cfg(*finetune_args(model, tmp_path / "bad", *base, "finetune.epochs=1", "finetune.wise_alphas=[2]"))
        )


@pytest.mark.slow
def test_checks_per_epoch_checks_inside_the_epoch_and_keeps_the_best_step(
    micro_model: tuple[Path, Path], tmp_path
) -> None:
    """`finetune.checks_per_epoch=2`: tuning AUROC is logged at least twice an epoch, the first time before
    the epoch ends, and the kept checkpoint is the step of the best check."""
    import csv

    from cehrx.tasks.finetune import run

    _, model = micro_model
    out = tmp_path / "sub"
    base = ("finetune.few_shot=[all]", "finetune.baselines=[]", "finetune.patience=10", "finetune.epochs=2")
    info = run(compose_cfg(*finetune_args(model, out, *base, "finetune.checks_per_epoch=2")))["budgets"]["all"][
        "finetune"
    ]
    steps = info["steps_per_epoch"]
    assert steps >= 2, "the fixture must give an epoch of at least two batches"
    val = [r for r in csv.DictReader((out / "logs" / "kall.csv").open()) if r.get("val_auroc")]
    assert len(val) >= 4 and int(val[0]["step"]) < steps and int(val[0]["epoch"]) == 0
    best = max(val, key=lambda r: float(r["val_auroc"]))
    assert info["best_val"] == pytest.approx(float(best["val_auroc"]), abs=1e-6)
    assert info["best_step"] >= 1 and info["best_epoch"] == int(best["epoch"])
    with pytest.raises(ValueError, match="whole number"):
        run(compose_cfg(*finetune_args(model, tmp_path / "bad", *base, "finetune.checks_per_epoch=0")))


def test_lora_trains_adapters_only_and_leaves_the_backbone(micro_model: tuple[Path, Path], tmp_path: Path) -> None:
    from cehrx.model.export import load_pretrained
    from cehrx.tasks.finetune import run

    _, model = micro_model
    out = tmp_path / "lora"
    lora_args = ("finetune.method=lora", "finetune.lora.rank=2", "finetune.epochs=2", "finetune.baselines=[]")
    result = run(compose_cfg(*finetune_args(model, out, *lora_args)))
    info = result["budgets"]["all"]["finetune"]
    assert 0 < info["parameters"]["trainable_fraction"] < 0.05
    state = torch.load(out / "checkpoints" / "best.ckpt", map_location="cpu", weights_only=False)["state_dict"]
    lora = [k for k in state if "lora_" in k]
    assert lora and all(".attn." in k for k in lora)
    assert any(state[k].abs().sum() > 0 for k in lora if "lora_B" in k)  # the adapters did train
    gpt, _ = load_pretrained(model)
    for name, w in gpt.state_dict().items():  # every pretrained weight is exactly as it was
        key = (
            "classifier.backbone." + name.replace(".weight", ".base_layer.weight")
            if any(f"classifier.backbone.{name.rsplit('.', 1)[0]}.base_layer.weight" == k for k in state)
            else "classifier.backbone." + name
        )
        assert torch.equal(state[key], w), name


@pytest.mark.slow
def test_finetune_resumes_after_sigkill(micro_model: tuple[Path, Path], tmp_path: Path) -> None:
    """A real kill after the first epoch's checkpoint; the rerun continues from it and logs each epoch once."""
    from cehrx.tasks.finetune import run

    _, model = micro_model
    out = tmp_path / "ft"
    args = finetune_args(model, out, "finetune.epochs=4", "finetune.patience=10", "finetune.baselines=[]")
    last = out / "work" / "kall" / "checkpoints" / "last.ckpt"
    log = tmp_path / "killed.log"
    with log.open("w") as f:  # a file, not a pipe: an undrained pipe would block the child when full
        proc = subprocess.Popen(
            [sys.executable, "-m", "cehrx", *args],
            cwd=Path(__file__).parents[2],
            stdout=subprocess.DEVNULL,
            stderr=f,
            env={**os.environ, "PYTHONUNBUFFERED": "1"},
        )
        deadline = time.time() + 300
        while not last.is_file() and proc.poll() is None and time.time() < deadline:
            time.sleep(0.02)
        proc.send_signal(signal.SIGKILL)
        proc.wait()
    assert last.is_file(), log.read_text()[-2000:]
    assert not (out / "metrics.json").exists() and not (out / "work" / "kall" / "result.json").exists()
    epoch_killed = torch.load(last, map_location="cpu", weights_only=False)["epoch"]
    assert epoch_killed < 3
    result = run(compose_cfg(*args))
    assert result["budgets"]["all"]["finetune"]["epochs_run"] == 4
    assert not (out / "work").exists()  # removed once the output is finished; its log is kept:
    import csv

    val = [r for r in csv.DictReader((out / "logs" / "kall.csv").open()) if r.get("val_auroc")]
    epochs = [int(r["epoch"]) for r in val]
    assert epochs.count(epoch_killed) == 1 and set(epochs) == {0, 1, 2, 3}  # the first run's rows were kept, not redone


@pytest.mark.slow
def test_lr_sweep_gives_one_job_per_lr_and_a_summary_ranked_on_tuning(
    micro_model: tuple[Path, Path], tmp_path: Path
) -> None:
    """`cehrx -m task=finetune ... finetune.lr=a,b`: one finished job per value in `<output_dir>/multirun`, each
    trained at its lr, and `sweep_summary.json` ranking them by tuning AUROC (never by the held-out score)."""
    _, model = micro_model
    out = tmp_path / "sweep"
    args = finetune_args(model, out, "finetune.epochs=1", "finetune.few_shot=[32]", "finetune.lr=1e-5,1e-3")
    proc = subprocess.run(
        [sys.executable, "-m", "cehrx", "-m", *args], cwd=tmp_path, capture_output=True, text=True, timeout=600
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    jobs = sorted(p for p in (out / "multirun").iterdir() if p.is_dir())
    assert len(jobs) == 2
    lrs = {json.loads((j / "metrics.json").read_text())["budgets"]["32"]["finetune"]["lr"] for j in jobs}
    assert lrs == {1e-5, 1e-3}
    summary = json.loads((out / "multirun" / "sweep_summary.json").read_text())
    tuning = [r["select"] for r in summary]
    assert all(isinstance(v, float) and 0 <= v <= 1 for v in tuning), tuning  # NaN would sort anywhere
    assert summary[0]["metric"] == "tuning AUROC (k=32)" and tuning == sorted(tuning, reverse=True)
    assert all("held-out AUROC finetune" in r and "held-out AUROC probe" in r for r in summary)


@pytest.mark.slow
def test_meds_dev_supervised_command_fine_tunes_on_given_labels(micro_model: tuple[Path, Path], tmp_path: Path) -> None:
    """The MEDS-DEV spec's `supervised.predict` (experiments/meds_dev/finetune/model.yaml), placeholders filled
    as MEDS-DEV fills them, runs `task=finetune` on a labels dir and writes held-out predictions in the
    meds-evaluation schema, one per held-out label."""
    _, model = micro_model
    meds = write_meds_fixture(tmp_path / "meds")  # the same seeded fixture the micro model was prepared from
    labels = tmp_path / "labels"
    labels.mkdir()
    table = extract_labels("gibleed_after_nsaid", meds)
    pq.write_table(table, labels / "0.parquet")
    spec = OmegaConf.load(REPO / "experiments" / "meds_dev" / "finetune" / "model.yaml")
    out = tmp_path / "out"
    command = spec.commands.supervised.predict.format(
        dataset_dir=meds,
        labels_dir=labels,
        model_initialization_dir=model,
        split="held_out",
        output_dir=out,
        demo=False,
    )
    args = shlex.split(command)
    assert args[0] == "cehrx"
    extra = ["probe.progress=false", "probe.min_code_labels=2", "finetune.n_boot=20", "finetune.progress=false"]
    extra += ["finetune.batch_tokens=2048", "finetune.epochs=1"]
    proc = subprocess.run(
        [sys.executable, "-m", "cehrx", *args[1:], *extra], cwd=tmp_path, capture_output=True, text=True, timeout=600
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    preds = read_predictions(out / "predictions.parquet")
    result = json.loads((out / "metrics.json").read_text())
    assert preds.num_rows == result["labels"]["test"]["n"] > 0 and result["labels"]["in"] == table.num_rows
    held = set(preds.column("subject_id").to_pylist())
    assert held <= set(table.column("subject_id").to_pylist())
