"""`task=pretrain` through the real Hydra configs on a synthetic prepared dir."""

from __future__ import annotations

import inspect
import json
import shutil
import socket
from pathlib import Path

import lightning as L
import pytest
import torch
from hydra.utils import instantiate

from cehrx.errors import CehrxError
from cehrx.model.export import load_pretrained
from cehrx.model.transformer import Block
from cehrx.tasks.pretrain import run
from tests.conftest import QUIET, compose_cfg

SMALL = ("model=micro", "model.max_seq_len=64", "task.datamodule.max_tokens_per_batch=512")


@pytest.fixture()
def prepared(synthetic_prepared: Path, tmp_path: Path) -> Path:
    return Path(shutil.copytree(synthetic_prepared, tmp_path / "prep"))


def cfg_for(prepared: Path, out: Path, *overrides: str):
    return compose_cfg(
        "task=pretrain", "trainer=cpu", f"data.prepared_dir={prepared}", f"output_dir={out}", *SMALL, *QUIET, *overrides
    )


def fast_dev_cfg(prepared: Path, out: Path, *overrides: str):
    """One training and one validation step of the micro model (`trainer.fast_dev_run`)."""
    return compose_cfg(
        "task=pretrain",
        "model=micro",
        "trainer=cpu",
        "trainer.fast_dev_run=true",
        *overrides,
        f"data.prepared_dir={prepared}",
        f"output_dir={out}",
        *QUIET,
    )


def test_fast_dev_run_through_hydra_configs(prepared: Path, tmp_path: Path) -> None:
    out = tmp_path / "run"
    metrics = run(fast_dev_cfg(prepared, out))
    assert metrics["global_step"] == 1 and metrics["val/loss"] > 0 and metrics["unigram_ppl"] > 1
    assert (out / "config.yaml").is_file() and (out / "metrics.json").is_file()
    saved = (out / "config.yaml").read_text()
    assert "vocab_size: null" not in saved and "name: pretrain" in saved
    gpt, vocab = load_pretrained(out)
    assert gpt.config.vocab_size == len(vocab) and gpt.config.name == "micro"
    assert (out / "model" / "train_config.yaml").is_file()


def test_future_codes_head_through_hydra_configs(prepared: Path, tmp_path: Path) -> None:
    out = tmp_path / "run"
    metrics = run(fast_dev_cfg(prepared, out, "task.module.future_codes_weight=0.3", "task.module.future_codes_n=32"))
    assert metrics["val/loss_future_codes"] > 0 and metrics["val/loss"] > 0
    gpt, _ = load_pretrained(out)  # the export holds the backbone only
    assert not any("future" in k for k in gpt.state_dict())
    bad = tmp_path / "bad"
    with pytest.raises(CehrxError, match="future_codes_n >= 1"):
        run(fast_dev_cfg(prepared, bad, "task.module.future_codes_weight=0.3", "task.module.future_codes_n=0"))
    assert not (bad / "model").exists() and not (bad / "checkpoints").exists()


def test_resume_continues_the_step_count(prepared: Path, tmp_path: Path) -> None:
    out = tmp_path / "run"
    common = ("trainer.val_check_interval=2", "callbacks.last.every_n_train_steps=2", "task.module.warmup_steps=1")
    first = run(cfg_for(prepared, out, "trainer.max_steps=2", *common))
    assert first["global_step"] == 2
    assert {p.name for p in (out / "checkpoints").iterdir()} >= {"last.ckpt", "best.ckpt"}
    with pytest.raises(CehrxError, match="overwrite=true"):  # a finished model is never clobbered silently
        run(cfg_for(prepared, out, "trainer.max_steps=4", *common))
    with pytest.raises(CehrxError, match="ckpt_path=last"):  # nor an unfinished run's checkpoints
        shutil.rmtree(out / "model")
        run(cfg_for(prepared, out, "trainer.max_steps=4", *common))
    second = run(cfg_for(prepared, out, "trainer.max_steps=4", "ckpt_path=last", *common))
    assert second["global_step"] == 4
    steps = [json.loads(x)["global_step"] for x in [(out / "metrics.json").read_text()]]
    assert steps == [4]
    ckpt = torch.load(out / "checkpoints" / "last.ckpt", map_location="cpu", weights_only=False)
    assert ckpt["global_step"] == 4
    import csv

    with (out / "logs" / "metrics.csv").open() as f:
        val_steps = sorted(int(r["step"]) for r in csv.DictReader(f) if r.get("val/loss"))
    assert val_steps[0] < 2 < val_steps[-1], (
        val_steps
    )  # the first run's rows survive the resume (Lightning's writer deleted them)


def test_clear_errors(prepared: Path, tmp_path: Path) -> None:
    with pytest.raises(CehrxError, match="does not exist"):
        run(cfg_for(tmp_path / "missing", tmp_path / "o1"))
    (prepared / "vocab.json").rename(prepared / "vocab.bak")
    with pytest.raises(CehrxError, match="vocab.json not found"):
        run(cfg_for(prepared, tmp_path / "o2"))
    (prepared / "vocab.bak").rename(prepared / "vocab.json")
    with pytest.raises(CehrxError, match="no checkpoint at"):
        run(cfg_for(prepared, tmp_path / "o3", "ckpt_path=last"))
    with pytest.raises(CehrxError, match="leave model.vocab_size=null"):
        run(cfg_for(prepared, tmp_path / "o4", "model.vocab_size=7"))


def _trainer_kwargs(name: str) -> dict:
    cfg = compose_cfg("task=pretrain", f"trainer={name}", "output_dir=/tmp/unused")
    partial = instantiate(cfg.trainer, _partial_=True)
    inspect.signature(L.Trainer).bind(**partial.keywords)  # every key is a real Trainer argument
    return partial.keywords


def test_fsdp_config_instantiates() -> None:
    from lightning.pytorch.strategies import FSDPStrategy
    from torch.distributed.fsdp.wrap import ModuleWrapPolicy

    kw = _trainer_kwargs("fsdp")
    strategy = kw["strategy"]
    assert isinstance(strategy, FSDPStrategy) and kw["precision"] == "bf16-mixed" and kw["gradient_clip_val"] > 0
    policy = strategy.kwargs["auto_wrap_policy"]
    assert isinstance(policy, ModuleWrapPolicy) and Block in policy._module_classes
    assert strategy._state_dict_type == "sharded"


def test_ddp_config_instantiates_on_cpu() -> None:
    from lightning.pytorch.strategies import DDPStrategy

    cfg = compose_cfg(
        "task=pretrain",
        "trainer=ddp",
        "output_dir=/tmp/unused",
        "trainer.accelerator=cpu",
        "trainer.devices=2",
        "trainer.precision=32-true",
    )
    trainer = instantiate(cfg.trainer, logger=False)
    assert isinstance(trainer.strategy, DDPStrategy) and trainer.num_devices == 2
    assert _trainer_kwargs("gpu")["precision"] == "bf16-mixed"


def test_logger_configs_instantiate(tmp_path: Path) -> None:
    from lightning.pytorch.loggers import CSVLogger, WandbLogger

    csv = instantiate(compose_cfg("task=pretrain", f"output_dir={tmp_path}").logger)
    assert isinstance(csv, CSVLogger) and Path(csv.log_dir) == tmp_path / "logs"
    wandb = instantiate(compose_cfg("task=pretrain", "logger=wandb", f"output_dir={tmp_path}").logger)
    assert isinstance(wandb, WandbLogger) and wandb._offline  # nothing leaves the machine unless configured
    assert not compose_cfg("task=pretrain", "logger=none", "callbacks=none").logger


@pytest.mark.slow
def test_ddp_spawn_two_processes_on_cpu(prepared: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    # Lightning would pick a port and leave it in this worker's environment for every later test
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        monkeypatch.setenv("MASTER_PORT", str(s.getsockname()[1]))
    out = tmp_path / "ddp"
    metrics = run(
        cfg_for(
            prepared,
            out,
            "trainer.strategy=ddp_spawn",
            "trainer.devices=2",
            "trainer.max_steps=3",
            "trainer.val_check_interval=3",
            "callbacks=none",
            "logger=none",
        )
    )
    assert metrics["global_step"] == 3
    # validation was split over both ranks and summed back: every target counted once
    single = compose_cfg("task=pretrain", f"data.prepared_dir={prepared}", *SMALL)
    dm = instantiate(single.task.datamodule)
    dm.setup()
    n_targets = sum(int((dm.val_set[(0, b)]["labels"] != -100).sum()) for b in range(len(dm.val_set.plan(0).batches)))
    assert metrics["val/tokens"] == n_targets
    load_pretrained(out)


def test_auto_restarts_a_run_killed_before_its_first_last_ckpt(prepared: Path, tmp_path: Path) -> None:
    """A run killed after its first validation (best.ckpt) but before its first last.ckpt: `ckpt_path=auto`,
    the SLURM requeue's command line, has nothing to resume and starts over (it used to refuse the leftovers)."""
    out = tmp_path / "run"
    common = ("trainer.max_steps=2", "trainer.val_check_interval=1", "ckpt_path=auto", "task.module.warmup_steps=1")
    first = run(cfg_for(prepared, out, *common))
    for p in (out / "checkpoints" / "last.ckpt", out / "metrics.json"):  # the state of a kill after step 1's best.ckpt
        p.unlink()
    shutil.rmtree(out / "model")
    assert (out / "checkpoints" / "best.ckpt").is_file() and (out / "logs" / "metrics.csv").is_file()
    again = run(cfg_for(prepared, out, *common))
    assert again["global_step"] == 2 and again["val/loss"] == first["val/loss"]
    import csv

    with (out / "logs" / "metrics.csv").open() as f:
        steps = [int(r["step"]) for r in csv.DictReader(f) if r.get("val/loss")]
    assert len(steps) == len(set(steps)), "the killed run's rows are not logged twice"


def test_the_model_export_is_written_last(prepared: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """A run that dies after training but before its metrics.json is not finished (model/config.json, the
    marker, comes last), so `ckpt_path=auto` completes it instead of calling it finished without metrics."""
    import cehrx.tasks.pretrain as pt
    from cehrx.tasks.scaffold import is_finished

    out = tmp_path / "run"
    real = pt.write_text

    def dies_at_metrics(path, text):
        if Path(path).name == "metrics.json":
            raise KeyboardInterrupt("killed")
        return real(path, text)

    monkeypatch.setattr(pt, "write_text", dies_at_metrics)
    with pytest.raises(KeyboardInterrupt):
        run(cfg_for(prepared, out, "trainer.max_steps=2", "ckpt_path=auto"))
    assert not is_finished("pretrain", out), "a finished-looking output without metrics.json"
    monkeypatch.setattr(pt, "write_text", real)
    metrics = run(cfg_for(prepared, out, "trainer.max_steps=2", "ckpt_path=auto"))
    assert metrics["global_step"] == 2 and json.loads((out / "metrics.json").read_text()) == metrics
    assert is_finished("pretrain", out)


@pytest.mark.slow
def test_a_resumed_run_continues_its_wandb_run(prepared: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """logger=wandb (offline): a resume logs into the run id of the run it resumes; a fresh start gets a new id."""
    pytest.importorskip("wandb")
    for key, value in {
        "WANDB_MODE": "offline",
        "WANDB_SILENT": "true",
        "WANDB_DIR": str(tmp_path / "wandb_home"),
    }.items():
        monkeypatch.setenv(key, value)
    monkeypatch.setenv("WANDB_CONFIG_DIR", str(tmp_path / "wandb_config"))
    monkeypatch.setenv("WANDB_CACHE_DIR", str(tmp_path / "wandb_cache"))
    out = tmp_path / "run"
    common = ("logger=wandb", "callbacks=none", "task.module.warmup_steps=1")

    def run_ids() -> list[str]:
        return sorted({p.name.rsplit("-", 1)[-1] for p in (out / "wandb").glob("offline-run-*")})

    run(cfg_for(prepared, out, "trainer.max_steps=2", *common))
    (first,) = run_ids()
    shutil.rmtree(out / "model")
    run(cfg_for(prepared, out, "trainer.max_steps=4", "ckpt_path=last", *common))
    assert run_ids() == [first], "the resumed run logged into the same W&B run"
    assert (out / "config.yaml").read_text().count(f"id: {first}") == 1
    run(cfg_for(prepared, out, "trainer.max_steps=2", "overwrite=true", *common))
    assert len(run_ids()) == 2, "starting over opens a new run"
