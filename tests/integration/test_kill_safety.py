"""Every task under a real SIGKILL (issue #23): `python -m cehrx task=<stage>` killed at a seeded random
point (or when a checkpoint appears), then run again.

Per stage, against an uninterrupted run of the same command (the reference):
- while killed, nothing half-written looks finished: the marker is absent, or the output is complete;
- the rerun's output equals the reference (token shards, predictions and metrics compared by content);
- the rerun leaves no temporary (`.<name>.tmp-*`, `.<name>.old-*`) of the killed run behind;
- a kill during `overwrite=true` never leaves no output: after `recover` a finished output is there, whole
  (zero-shot's chunks included: the new run works in `work/`, beside them).

One micro model for the module; the tests share it, so they run on one xdist worker (`xdist_group`).
"""

from __future__ import annotations

import contextlib
import json
import os
import re
import signal
import subprocess
import sys
import time
import zlib
from pathlib import Path
from typing import Any, Callable

import numpy as np
import pyarrow.parquet as pq
import pytest
import torch

from tests.conftest import QUIET, REPO, compose_cfg
from tests.integration.test_probe_task import write_meds_fixture

# one torch thread: the same arithmetic in this process and in the killed ones (OMP_NUM_THREADS=1 there)
pytestmark = [pytest.mark.slow, pytest.mark.xdist_group("kill_safety"), pytest.mark.usefixtures("one_thread")]

STAGES = ("prepare", "pretrain", "probe", "zeroshot", "generate", "evaluate", "finetune")
# keys of a marker JSON that describe the process rather than the result (times, speeds, what was resumed)
VOLATILE = re.compile(
    r"(seconds|timings|_s$|per_s$|per_second|elapsed|resumed|feature_cache|exported_checkpoint|^train_tokens)"
)


def sampling_key(task: str) -> str:
    """Where `max_new_tokens` lives: the shared `sampling:` block, or (before it existed) the task's own block."""
    return "sampling" if "sampling" in compose_cfg(f"task={task}") else task


class World:
    """The MEDS fixture, each stage's command line, and the uninterrupted reference run of each stage."""

    def __init__(self, root: Path) -> None:
        self.root = root
        self.meds = write_meds_fixture(root / "meds_src", n=120)
        self.refs: dict[str, tuple[Path, float]] = {}

    def args(self, stage: str, out: Path) -> list[str]:
        prep, model = self.root / "ref" / "prepare", self.root / "ref" / "pretrain"
        labels = ("probe.task=gibleed_after_nsaid", f"probe.labels_cache_dir={self.root / 'labels_cache'}")
        probe = (*labels, "probe.progress=false", "probe.min_code_labels=2")
        return [f"task={stage}", f"output_dir={out}"] + {
            "prepare": ["data=meds", f"data.path={self.meds}", "task.min_subjects=2", "task.duckdb.threads=1"],
            "pretrain": [
                "trainer=cpu",
                "model=micro",
                "model.max_seq_len=64",
                f"data.prepared_dir={prep}",
                "trainer.max_steps=24",
                "trainer.val_check_interval=6",
                "trainer.log_every_n_steps=1",
                "callbacks.last.every_n_train_steps=8",
                "callbacks.early_stopping.patience=100",
                "task.datamodule.max_tokens_per_batch=512",
                "ckpt_path=auto",
                *QUIET,
            ],
            "probe": [f"model_dir={model}", *probe, "probe.n_boot=20", "probe.few_shot=[]", "probe.baselines=[counts]"],
            "zeroshot": [
                f"model_dir={model}",
                *labels,
                "zeroshot.num_samples=2",
                "zeroshot.chunk_size=8",
                "zeroshot.n_boot=20",
                "zeroshot.progress=false",
                f"{sampling_key('zeroshot')}.max_new_tokens=16",
            ],
            "generate": [
                f"model_dir={model}",
                f"data.prepared_dir={prep}",
                "generate.num_patients=8",
                "generate.shard_size=2",
                "generate.progress=false",
                "generate.duckdb.threads=1",
                "generate.threads=1",
            ],
            "evaluate": [
                f"data.prepared_dir={prep}",
                f"synthetic_dir={self.root / 'ref' / 'generate'}",
                "evaluate.tasks=[gibleed_after_nsaid]",
                "evaluate.baseline=marginal",
                "evaluate.top_codes=10",
                "evaluate.n_boot=10",
            ],
            "finetune": [
                f"model_dir={model}",
                *probe,
                "probe.batch_tokens=2048",
                "finetune.epochs=4",
                "finetune.patience=10",
                "finetune.baselines=[]",
                "finetune.n_boot=20",
                "finetune.progress=false",
            ],
        }[stage]

    def ref(self, stage: str) -> tuple[Path, float]:
        """(output dir, seconds) of the stage's uninterrupted run, made on first use (with its inputs)."""
        if stage not in self.refs:
            needs = {"pretrain": ["prepare"], "evaluate": ["prepare", "generate"]}.get(stage, ["pretrain"])
            for dep in needs if stage != "prepare" else []:
                self.ref(dep)
            out = self.root / "ref" / stage
            start = time.perf_counter()
            run_in_process(self.args(stage, out))
            self.refs[stage] = (out, time.perf_counter() - start)
        return self.refs[stage]


@pytest.fixture(scope="module")
def world(tmp_path_factory: pytest.TempPathFactory) -> World:
    return World(tmp_path_factory.mktemp("kill"))


def run_in_process(args: list[str]) -> Any:
    from hydra.utils import get_method

    cfg = compose_cfg(*args)
    return get_method(cfg.task.fn)(cfg)


# ------------------------------------------------------------------ what "the same output" means per stage


def tables(paths: list[Path]) -> dict[str, list]:
    """The rows of parquet files read in name order, as columns of Python values (content, not bytes)."""
    return nan_free(pq.read_table([str(p) for p in sorted(paths)]).to_pydict()) if paths else {}


def nan_free(obj: Any) -> Any:
    """NaN spelled "NaN", so that equal contents compare equal."""
    if isinstance(obj, float) and obj != obj:
        return "NaN"
    if isinstance(obj, dict):
        return {k: nan_free(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [nan_free(v) for v in obj]
    return obj


def normalized(obj: Any, out: Path) -> Any:
    """A marker JSON without its volatile keys, this run's output path written as <OUT>."""
    if isinstance(obj, dict):
        return {k: normalized(v, out) for k, v in obj.items() if not VOLATILE.search(str(k))}
    if isinstance(obj, list):
        return [normalized(v, out) for v in obj]
    if isinstance(obj, str):
        return obj.replace(str(out.resolve()), "<OUT>").replace(str(out), "<OUT>")
    return nan_free(obj)


def content(stage: str, out: Path) -> dict[str, Any]:
    """What must be equal between a resumed run and the reference."""

    def marker(name: str) -> Any:
        return normalized(json.loads((out / name).read_text()), out)

    if stage == "prepare":
        return {
            **{s: tables(list((out / "tokens" / s).glob("*.parquet"))) for s in ("train", "tuning", "held_out")},
            "vocab": json.loads((out / "vocab.json").read_text()),
            "prepare.json": marker("prepare.json"),
        }
    if stage == "pretrain":
        from safetensors.torch import load_file

        weights = load_file(str(out / "model" / "model.safetensors"))
        metrics = json.loads((out / "metrics.json").read_text())
        return {
            "weights": {k: v.numpy().tobytes() for k, v in sorted(weights.items())},
            "metrics": {k: metrics[k] for k in ("global_step", "val/loss", "val/ppl")},
        }
    if stage == "generate":
        return {"tokens": tables(list((out / "tokens" / "train").glob("*.parquet"))), "json": marker("generate.json")}
    found = {"metrics": marker("metrics.json")}
    for name in ("predictions.parquet", "details.parquet"):
        if (out / name).is_file():
            found[name] = tables([out / name])
    if stage == "zeroshot":  # the finished output's chunks: the work a later run can resume from, whole
        found["chunks"] = tables(list((out / "chunks").glob("*.parquet")))
        found["manifest"] = json.loads((out / "chunks" / "manifest.json").read_text())
    return found


def finished(stage: str, out: Path) -> bool:
    from cehrx.tasks.scaffold import is_finished

    return is_finished(stage, out)


def temporaries(out: Path) -> list[str]:
    """Leftovers of killed writers: `.<name>.tmp-<pid>-*` / `.<name>.old-<pid>-*` beside the output or
    anywhere inside it (atomic files: chunks, shards, caches)."""
    pat = re.compile(r"^\..+\.(tmp|old)-\d+-[0-9a-f]+$")
    places = [*out.parent.iterdir(), *(out.rglob("*") if out.is_dir() else [])]
    return sorted(str(p) for p in places if pat.match(p.name))


# ------------------------------------------------------------------ killing


def snapshot(out: Path) -> set[tuple[str, int]]:
    """Paths (and mtimes) of the output and its hidden siblings: a change means the run has started writing."""
    roots = [out, *out.parent.glob(f".{out.name}.*")]
    found = set()
    for r in roots:
        for p in [r, *r.rglob("*")] if r.is_dir() else [r]:
            with contextlib.suppress(FileNotFoundError):  # renamed by the run between listing and stat
                found.add((str(p), p.stat().st_mtime_ns))
    return found


def kill_run(args: list[str], out: Path, log: Path, when: Callable[[], bool] | float, ref_seconds: float) -> bool:
    """Start `python -m cehrx <args>` and SIGKILL it: once `when()` holds, or `when` x the reference's
    duration after it starts writing. Returns whether the kill found it running."""
    before = snapshot(out) if not callable(when) else set()
    with log.open("w") as f:
        proc = subprocess.Popen(
            [sys.executable, "-m", "cehrx", *args],
            cwd=REPO,
            stdout=f,
            stderr=subprocess.STDOUT,
            env={**os.environ, "OMP_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1"},
        )
        try:
            deadline = time.time() + 300
            if callable(when):
                while not when() and proc.poll() is None and time.time() < deadline:
                    time.sleep(0.005)
            else:
                while snapshot(out) == before and proc.poll() is None and time.time() < deadline:
                    time.sleep(0.01)
                time.sleep(when * ref_seconds)
            running = proc.poll() is None
        finally:  # never leave the child writing into `out` beside the rerun, whatever failed here
            proc.send_signal(signal.SIGKILL)
            proc.wait()  # reaped: `recover` sees a dead pid
    assert proc.returncode in (0, -signal.SIGKILL), log.read_text()[-3000:]
    return running


# Where a fresh run is killed: when one of these files appears (relative to the output's parent; `{o}` is the
# output's name), picked by a seeded draw per stage. Each is a point in the middle of the stage's work:
# a shard, chunk or checkpoint the rerun must resume from, or a file of a temporary output still being written.
KILL_FILES = {
    "prepare": [".{o}.tmp-*/tokens/train/*.parquet", ".{o}.tmp-*/tokens/held_out/*.parquet"],
    "pretrain": ["{o}/checkpoints/last.ckpt"],  # the first, at step 8 of 24
    "probe": [".{o}.tmp-*/features.parquet", ".{o}.tmp-*/predictions/probe.parquet"],
    "zeroshot": ["{o}/work/chunks/1.parquet", "{o}/work/chunks/2.parquet"],
    "generate": [".{o}.partial/shard_stats/1.json", ".{o}.partial/shard_stats/2.json"],
    "evaluate": [
        ".{o}.tmp-*/baseline_marginal/tokens/train/*.parquet",
        ".{o}.tmp-*/baseline_marginal/meds/**/*.parquet",
    ],
    "finetune": ["{o}/work/kall/checkpoints/last.ckpt"],  # after the first of 4 epochs
}


def appeared(out: Path, pattern: str) -> Callable[[], bool]:
    pattern = pattern.format(o=out.name)
    return lambda: next(iter(out.parent.glob(pattern)), None) is not None


@pytest.mark.parametrize("stage", STAGES)
def test_a_killed_stage_reruns_to_the_uninterrupted_output(world: World, stage: str) -> None:
    ref, seconds = world.ref(stage)
    expected = content(stage, ref)
    rng = np.random.default_rng(zlib.crc32(stage.encode()))
    out = world.root / "killed" / stage
    out.parent.mkdir(parents=True, exist_ok=True)
    args = world.args(stage, out)

    # 1. a fresh run killed: nothing half-written looks finished; the rerun gives the reference's output
    pattern = KILL_FILES[stage][int(rng.integers(len(KILL_FILES[stage])))]
    assert kill_run(args, out, world.root / f"{stage}.log", appeared(out, pattern), seconds), "killed too late"
    if finished(stage, out):
        assert content(stage, out) == expected, "a finished-looking output that is not complete"
    if pattern.startswith(".{o}.tmp-"):
        assert temporaries(out), "killed inside its temporary output: a SIGKILL runs no cleanup"
    if stage == "pretrain":
        killed_step = torch.load(out / "checkpoints" / "last.ckpt", map_location="cpu", weights_only=False)[
            "global_step"
        ]
        assert not finished(stage, out) and killed_step < 24
    run_in_process(args)
    assert content(stage, out) == expected
    assert temporaries(out) == [], "the rerun cleaned up after the killed run"
    assert not (out.parent / f".{out.name}.partial").exists()
    if stage == "pretrain":  # resuming lost none of the killed run's logged steps
        import csv

        with (out / "logs" / "metrics.csv").open() as f:
            steps = {int(r["step"]) for r in csv.DictReader(f) if r.get("train/loss")}
        assert steps == set(range(24)) and killed_step >= 8

    # 2. an overwrite killed: the user is never left without a finished output
    kill_run(
        [*args, "overwrite=true"], out, world.root / f"{stage}-overwrite.log", float(rng.uniform(0.0, 1.0)), seconds
    )
    from cehrx.tasks.scaffold import recover_output

    recover_output(stage, out)
    assert finished(stage, out), "a kill during overwrite=true left no finished output"
    assert content(stage, out) == expected  # old and new are both the reference's output
    assert temporaries(out) == []
