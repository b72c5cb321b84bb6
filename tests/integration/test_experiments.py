"""Experiment configs, `-m` sweeps, the SLURM launcher and MEDS-DEV argument names."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
from hydra import compose, initialize_config_dir
from omegaconf import OmegaConf

from cehrx.configs import config_dir
from cehrx.model.export import load_pretrained
from cehrx.tasks.pretrain import resolve_ckpt_path
from tests.conftest import QUIET, REPO, compose_cfg

EXPERIMENTS = sorted(p.stem for p in (Path(config_dir()) / "experiment").glob("*.yaml"))


def compose_with_hydra(*overrides: str):
    with initialize_config_dir(config_dir=config_dir(), version_base="1.3"):
        return compose("config", overrides=list(overrides), return_hydra_config=True)


def test_the_issue_experiments_ship() -> None:
    assert {"demo", "synthea1k", "mimic_demo_meds", "cehrxgpt_base"} <= set(EXPERIMENTS)


@pytest.mark.parametrize("name", EXPERIMENTS)
def test_every_experiment_composes_and_resolves(name: str) -> None:
    cfg = compose_cfg(f"experiment={name}")
    resolved = OmegaConf.to_container(cfg, resolve=True)
    assert resolved["task"]["fn"].startswith("cehrx.tasks.")
    assert resolved["output_dir"]
    if cfg.task.name == "pipeline":  # each stage, with the experiment's overrides, composes too
        for stage in cfg.pipeline.stages:
            stage_cfg = compose_cfg(f"experiment={name}", f"task={stage}", *cfg.pipeline.overrides.get(stage, []))
            assert stage_cfg.task.name == stage


def test_cehrxgpt_base_is_the_published_recipe() -> None:
    cfg = compose_with_hydra("experiment=cehrxgpt_base")
    assert (cfg.model.n_layer, cfg.model.n_embd, cfg.model.max_seq_len) == (14, 768, 8192)
    assert cfg.task.datamodule.max_tokens_per_batch == 16384 and cfg.task.module.lr in (1e-4, 2e-4)
    assert cfg.callbacks.early_stopping.monitor == "val/loss" and cfg.ckpt_path == "auto"


def test_slurm_launcher_takes_its_shape_from_the_trainer() -> None:
    cfg = compose_with_hydra(
        "hydra/launcher=slurm", "experiment=cehrxgpt_base", "trainer.devices=4", "trainer.num_nodes=3", "local=example"
    )
    launcher = OmegaConf.to_container(cfg.hydra.launcher, resolve=True)
    assert launcher["_target_"].endswith("SlurmLauncher")
    assert (launcher["nodes"], launcher["tasks_per_node"], launcher["gpus_per_node"]) == (3, 4, 4)
    assert launcher["partition"] == "gpu" and launcher["account"] == "my_account"  # site keys from configs/local
    assert launcher["max_num_timeout"] > 0 and launcher["submitit_folder"].startswith(cfg.output_dir)
    cpu = compose_with_hydra("hydra/launcher=slurm", "task=pretrain", "trainer=cpu", "local=example")
    assert OmegaConf.to_container(cpu.hydra.launcher, resolve=True)["gpus_per_node"] == 0  # a CPU job asks for no GPU


def test_sweep_job_dirnames_stay_short_and_stable() -> None:
    from cehrx.configs import MAX_JOB_DIRNAME, job_dirname

    assert job_dirname("model.lr=0.001,trainer.max_steps=9") == "model.lr=0.001,trainer.max_steps=9"
    assert job_dirname("probe.task=/a/b.yaml") == "probe.task=_a_b.yaml"  # never a nested path
    long = ",".join(f"trainer.key_{i}=value_{i}" for i in range(30))
    name = job_dirname(long)
    assert len(name) == MAX_JOB_DIRNAME and name == job_dirname(long) and name != job_dirname(long + "x")


def test_data_shortcuts_resolve_from_any_directory(tmp_path: Path) -> None:
    """`data=gibleed` etc. name ../shared/data relative to the project, not to where cehrx runs."""
    proc = run_cli("task=show", "data=synthea20k", "--cfg", "job", "--resolve", cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr[-2000:]
    path = Path(OmegaConf.create(proc.stdout).data.path)
    assert path.is_absolute() and path == (REPO.parent / "shared" / "data" / "synthea20k" / "meds").resolve()


def test_ckpt_path_auto_starts_fresh_then_resumes(tmp_path: Path) -> None:
    assert resolve_ckpt_path("auto", tmp_path) is None
    (tmp_path / "checkpoints").mkdir()
    (tmp_path / "checkpoints" / "last.ckpt").write_bytes(b"x")
    assert resolve_ckpt_path("auto", tmp_path) == str(tmp_path / "checkpoints" / "last.ckpt")


def run_cli(*args: str, cwd: Path) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "cehrx", *args], cwd=cwd, capture_output=True, text=True, timeout=600)


@pytest.mark.slow
def test_two_job_sweep_writes_one_stable_dir_per_job(synthetic_prepared: Path, tmp_path: Path) -> None:
    out = tmp_path / "sweep"
    proc = run_cli(
        "-m",
        "task=pretrain",
        "model=micro",
        "model.max_seq_len=64",
        "task.datamodule.max_tokens_per_batch=512",
        "trainer.max_steps=2",
        "trainer.val_check_interval=2",
        *QUIET,
        "logger=none",
        f"data.prepared_dir={synthetic_prepared}",
        f"output_dir={out}",
        "model.lr=1e-3,3e-3",
        cwd=tmp_path,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    jobs = sorted(p for p in (out / "multirun").iterdir() if p.is_dir())
    assert len(jobs) == 2  # named by each job's overrides, e.g. ...,model.lr=0.001,...
    for lr, job in zip(("0.001", "0.003"), jobs):
        assert f"model.lr={lr}," in job.name
        load_pretrained(job)
        assert OmegaConf.load(job / "config.yaml").task.module.lr == float(lr)
    assert not (REPO / "multirun").exists()
    summary = json.loads((out / "multirun" / "sweep_summary.json").read_text())  # cehrx.sweep.SweepSummary
    losses = [r["select"] for r in summary]
    assert all(isinstance(v, float) and v == v for v in losses), losses  # finite: NaN would sort anywhere
    assert {r["job"] for r in summary} == {j.name for j in jobs} and losses == sorted(losses)  # lowest val/loss first
    assert summary[0]["metric"] == "val/loss" and (out / "multirun" / "sweep_summary.md").is_file()


def test_meds_dev_argument_names_reach_the_config(tmp_path: Path) -> None:
    proc = run_cli(
        "task=show",
        "dataset_dir=/nowhere/meds",
        "model_initialization_dir=/m",
        "split=tuning",
        "--cfg",
        "job",
        "--resolve",
        cwd=tmp_path,
    )
    assert proc.returncode == 0, proc.stderr[-2000:]
    cfg = OmegaConf.create(proc.stdout)
    assert cfg.data.source == "meds" and cfg.data.path == "/nowhere/meds"
    assert cfg.model_dir == "/m" and cfg.split == "tuning"


@pytest.mark.parametrize("spec_path", ["model.yaml", "finetune/model.yaml"])
def test_meds_dev_model_yaml_calls_cehrx_with_its_placeholders(spec_path: str) -> None:
    spec = OmegaConf.load(REPO / "experiments" / "meds_dev" / spec_path)
    unsup, sup = spec.commands.unsupervised.train, spec.commands.supervised
    assert unsup.startswith("cehrx ") and "{dataset_dir}" in unsup and "{output_dir}" in unsup
    for needed in ("{labels_dir}", "{model_initialization_dir}", "{split}", "{output_dir}", "{dataset_dir}"):
        assert needed in sup.predict
