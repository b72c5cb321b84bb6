"""SLURM for real: jobs through the Hydra submitit launcher on a one-node cluster on localhost.

`scripts/slurm_local.sh` starts munge, slurmctld and slurmd (2 CPUs, no GPU; installed with apt when
missing and root); the tests are skipped with the reason when SLURM cannot start. Each test submits
as a user would: `cehrx -m hydra/launcher=slurm local=localhost_slurm ...` from a shell.
"""

from __future__ import annotations

import os
import re
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from cehrx.model.export import load_pretrained
from tests.slurm_cluster import SCRIPT, ensure_cluster

pytestmark = [
    pytest.mark.slurm,
    pytest.mark.slow,
    pytest.mark.xdist_group("slurm"),
]  # one worker starts and stops the cluster

LAUNCH = ("-m", "hydra/launcher=slurm", "local=localhost_slurm")
TRAIN = (
    "task=pretrain",
    "model=micro",
    "trainer=cpu",
    "model.max_seq_len=64",
    "task.datamodule.max_tokens_per_batch=512",
    "trainer.enable_progress_bar=false",
    "trainer.enable_model_summary=false",
    "trainer.num_sanity_val_steps=0",
)


@pytest.fixture(scope="module")
def slurm() -> dict[str, str]:
    """The environment a SLURM client needs (one torch thread per job: 2 jobs share the 2 CPUs, and
    the weights compared below must not depend on how many threads summed them)."""
    env = ensure_cluster()
    if isinstance(env, str):
        pytest.skip(env)
    yield {**os.environ, **env, "OMP_NUM_THREADS": "1"}
    subprocess.run(["bash", str(SCRIPT), "stop"], capture_output=True, timeout=120)


def cehrx(*args: str, env: dict[str, str], cwd: Path, timeout: int = 600) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "cehrx", *args], cwd=cwd, env=env, capture_output=True, text=True, timeout=timeout
    )


def job_logs(out: Path) -> list[Path]:
    """The submitit logs: `<output_dir>/.submitit/<job id>/<job id>_0_log.out` (README, SLURM section)."""
    return sorted((out / ".submitit").glob("*/*_0_log.out"))


def test_two_value_sweep_runs_as_two_jobs_with_their_own_dirs(slurm, synthetic_prepared: Path, tmp_path: Path) -> None:
    out = tmp_path / "sweep"
    proc = cehrx(
        *LAUNCH,
        *TRAIN,
        "trainer.max_steps=2",
        "trainer.val_check_interval=2",
        "logger=none",
        f"data.prepared_dir={synthetic_prepared}",
        f"output_dir={out}",
        "model.lr=1e-3,3e-3",
        env=slurm,
        cwd=tmp_path,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    jobs = sorted(p for p in (out / "multirun").iterdir() if p.is_dir())
    assert [("model.lr=0.001," in j.name, "model.lr=0.003," in j.name) for j in jobs] == [(True, False), (False, True)]
    for job in jobs:
        load_pretrained(job)  # each job wrote its finished model into its own stable dir
    logs = job_logs(out)
    assert len({p.parent.name for p in logs}) == 2, "two SLURM jobs, one log each"
    assert all(p.stat().st_size > 0 for p in logs)


def test_requeued_job_resumes_to_the_same_final_step_and_weights(
    slurm, synthetic_prepared: Path, tmp_path: Path
) -> None:
    steps = 600  # ~20 s: longer than SLURM's KillWait (5 s), during which the job runs on after `scontrol requeue`'s SIGTERM
    run = (
        *TRAIN,
        f"trainer.max_steps={steps}",
        "trainer.val_check_interval=60",
        "callbacks.last.every_n_train_steps=20",
        "trainer.log_every_n_steps=1",
        "ckpt_path=auto",
        "callbacks.early_stopping=null",
        f"data.prepared_dir={synthetic_prepared}",
    )
    ref = cehrx(
        *run, f"output_dir={tmp_path / 'ref'}", env=slurm, cwd=tmp_path
    )  # the same run, never interrupted, outside SLURM
    assert ref.returncode == 0, ref.stderr[-3000:]

    out = tmp_path / "requeued"
    proc = subprocess.Popen(
        [sys.executable, "-m", "cehrx", *LAUNCH, *run, f"output_dir={out}"],
        cwd=tmp_path,
        env=slurm,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
    )
    try:
        job_id = _requeue_after_first_checkpoint(out, slurm)
        stdout, _ = proc.communicate(timeout=600)
    finally:
        proc.kill()
    assert proc.returncode == 0, stdout[-3000:]
    info = _job_info(job_id, slurm)
    assert re.search(r"Restarts=1\b", info) and "JobState=COMPLETED" in info, info

    (job,) = [p for p in (out / "multirun").iterdir() if p.is_dir()]
    ckpt = torch.load(job / "checkpoints" / "last.ckpt", map_location="cpu", weights_only=False)
    assert ckpt["global_step"] == steps
    a, b = load_pretrained(job)[0].state_dict(), load_pretrained(tmp_path / "ref")[0].state_dict()
    assert all(torch.equal(a[k], b[k]) for k in a), "resumed weights equal the uninterrupted run's"
    logged = _logged_steps(job / "logs" / "metrics.csv")
    assert set(range(1, steps)) <= logged, "the training log keeps the steps from before the requeue"


def _requeue_after_first_checkpoint(out: Path, env: dict[str, str]) -> str:
    """Wait for the running job's first `last.ckpt`, then `scontrol requeue` it; returns the job id."""
    deadline = time.time() + 300
    while time.time() < deadline:
        ckpts = list((out / "multirun").glob("*/checkpoints/last.ckpt")) if (out / "multirun").is_dir() else []
        ids = subprocess.run(
            ["squeue", "-h", "-o", "%i", "-t", "RUNNING"], env=env, capture_output=True, text=True
        ).stdout.split()
        if ckpts and ids:
            subprocess.run(["scontrol", "requeue", ids[0]], env=env, check=True, capture_output=True)
            return ids[0]
        time.sleep(0.2)
    raise AssertionError(f"no running job with a checkpoint under {out} after 300 s")


def _job_info(job_id: str, env: dict[str, str]) -> str:
    """`scontrol show job` once the job has left RUNNING/COMPLETING (the result file can come a moment earlier)."""
    for _ in range(100):
        info = subprocess.run(["scontrol", "show", "job", job_id], env=env, capture_output=True, text=True).stdout
        if "JobState=RUNNING" not in info and "JobState=COMPLETING" not in info:
            break
        time.sleep(0.2)
    return info


def _logged_steps(path: Path) -> set[int]:
    import csv

    with path.open() as f:
        return {int(r["step"]) for r in csv.DictReader(f) if r.get("train/loss")}


def test_failed_job_reports_the_cehrx_error_and_exits_non_zero(slurm, tmp_path: Path) -> None:
    out = tmp_path / "bad"
    proc = cehrx(
        *LAUNCH, *TRAIN, f"data.prepared_dir={tmp_path / 'missing'}", f"output_dir={out}", env=slurm, cwd=tmp_path
    )
    assert proc.returncode != 0
    assert len(job_logs(out)) == 1, proc.stderr[-3000:]
    (log,) = job_logs(out)
    assert re.search(r"^cehrx: error: .*missing", log.read_text(), re.M), log.read_text()[-2000:]


def test_sharded_prepare_as_an_array_of_shard_jobs_then_the_reduce(slurm, tmp_path: Path) -> None:
    """A folder source (csv): `task.stage=partition` (one SLURM job) reads its tables into shards once, then
    `task.shard=range(0,N)` maps one shard per SLURM job into the one output, and `task.stage=reduce`
    finishes it. The output is the single pass's, byte for byte (README "prepare at any size"), and
    every job's log is still there after the reduce."""
    from tests.conftest import shared_data
    from tests.integration.test_prepare_sharded import assert_same_output

    src = shared_data("omop_synthea1k/csv")
    out = tmp_path / "sharded"
    common = ("task=prepare", "data=synthea1k", f"data.path={src}", "task.shards=3", f"output_dir={out}")
    proc = cehrx(*LAUNCH, *common, "task.shard=0", env=slurm, cwd=tmp_path)
    assert proc.returncode != 0 and "task.stage=partition" in job_logs(out)[0].read_text(), (
        "no map before the partition"
    )
    proc = cehrx(*LAUNCH, *common, "task.stage=partition", env=slurm, cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert (tmp_path / ".sharded.shards" / "source" / "done.json").is_file(), "the job kept the one output dir"
    proc = cehrx(*LAUNCH, *common, "task.shard=range(0,3)", env=slurm, cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert len({p.parent.name for p in job_logs(out)}) == 5, "three SLURM jobs, one per shard (and two before)"
    assert sorted(p.name for p in (tmp_path / ".sharded.shards" / "map").iterdir()) == ["0", "1", "2"]
    proc = cehrx(*common, "task.stage=reduce", env=slurm, cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr[-3000:]
    single = cehrx(
        "task=prepare",
        "data=synthea1k",
        f"data.path={src}",
        f"output_dir={tmp_path / 'single'}",
        env=slurm,
        cwd=tmp_path,
    )
    assert single.returncode == 0, single.stderr[-3000:]
    assert_same_output(tmp_path / "single", out)
    logs = job_logs(out)
    assert len({p.parent.name for p in logs}) == 5, "the jobs' logs outlive the reduce that finished the output"
    assert sum("prepared shard" in p.read_text() for p in logs) == 3, [p.read_text()[-500:] for p in logs]
