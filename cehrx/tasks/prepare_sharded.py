"""`cehrx task=prepare` at any size: subject shards, each a job with a fixed memory budget (DESIGN §4.1).

    partition a folder source (parquet or csv), once: each table read once, into per-shard parquet with the
              columns prepare reads, so a shard's `map` reads its own rows only (`omop_tables.partition`)
    map       per shard: its subjects' rows of the source -> events, splits, MEDS rows, visits; spills
              train code counts and values; keeps its DuckDB database (`state.duckdb`)
    reduce    kept codes and value deciles from the spills (`shard_merge`); per split, the MEDS copy's file
              merged from the shards' parts (OMOP; `meds_gather`: started in the pool here, it runs beside
              what follows); per shard, its visits (years, ages, train subjects per token) and its subjects,
              visits and events in token order (saved for its tokenize job: ordered once); the vocabulary
              and the output files' subject ranges; per shard, tokens cut into its part of every output
              file; then the output: token files, vocab.json, the MEDS files moved in, prepare.json, as
              the single pass writes them

Every shard job is idempotent: it writes into a temporary sibling renamed into place with its
`done.json` (`sharding.job`), and a job whose marker exists is skipped, so a rerun after a kill
redoes only unfinished shards. Jobs after `map` read the shard's database in a transaction they roll
back, so they never change what `map` left. The work lives in `task.work_dir` (default: a hidden
sibling of the output), keyed by a fingerprint of the settings; it is removed once the output is
finished (`task.keep_work=true` keeps it).

Where the jobs run: a process pool of `task.workers` (spawned processes), or one SLURM array job per
shard for `map` (`-m hydra/launcher=slurm 'task.shard=range(0,N)'`), then `task.stage=reduce` on one
node; a folder source first needs `task.stage=partition` (one job), which a map job refuses to go without.
The same jobs and the same files either way, so the same output.
"""

from __future__ import annotations

import logging
import multiprocessing as mp
import shutil
import time
from concurrent.futures import Future, ProcessPoolExecutor
from pathlib import Path

from omegaconf import DictConfig, OmegaConf

from cehrx.data.atomic import recover
from cehrx.data.sharding import (
    DONE,
    HASH_VERSION,
    choose_shards,
    claim_plan,
    fingerprint,
    is_done,
    read_done,
)
from cehrx.data.shards import SPLITS
from cehrx.errors import DataError
from cehrx.progress import Stages
from cehrx.tasks import prepare_jobs as shard_jobs
from cehrx.tasks.scaffold import guard, task_output, write_marker

log = logging.getLogger("cehrx.prepare")
# The files the jobs leave for each other (`prepare_jobs`' layout): in the fingerprint, so a work dir left by a
# version whose jobs wrote other files is refused, not half reused. Bump it when a job's files change.
WORK_LAYOUT = 2  # 2: MEDS parts per split, the visits job's ordered events for tokenize
# Settings that change how the work is run, not what it makes: left out of the work dir's fingerprint.
RUN_ONLY = ("workers", "stage", "shard", "shards", "memory_budget", "duckdb", "keep_work", "work_dir")


def resolve_shards(cfg: DictConfig) -> int:
    """`task.shards`, else 1 unless a memory budget or several workers are asked for and the data
    exceeds one budget (`sharding.choose_shards`, from the source's row count)."""
    t = cfg.task
    if t.get("shards"):
        return int(t.shards)
    if t.get("shard") is not None:
        raise DataError("task.shard (one shard's job) needs task.shards (how many there are), e.g. task.shards=256")
    if not t.get("memory_budget") and int(t.get("workers") or 1) <= 1:
        return 1
    return choose_shards(shard_jobs.source_rows(cfg), shard_jobs.budget(t), int(t.get("workers") or 1))


def work_dir(cfg: DictConfig) -> Path:
    out = Path(str(cfg.output_dir)).resolve()
    return Path(str(cfg.task.work_dir)) if cfg.task.get("work_dir") else out.parent / f".{out.name}.shards"


def plan_of(cfg: DictConfig, shards: int) -> dict:
    t = OmegaConf.to_container(cfg.task, resolve=True)
    settings = {
        "data": OmegaConf.to_container(cfg.data, resolve=True),
        "task": {k: v for k, v in t.items() if k not in RUN_ONLY},
        "shard_hash": HASH_VERSION,
        "work_layout": WORK_LAYOUT,
    }
    return {"shards": shards, "fingerprint": fingerprint(settings)}


def run(cfg: DictConfig, shards: int) -> dict:
    """The stage `task.stage` asks for: `partition` (a folder source's tables into shards, before the maps),
    `map` (the default when `task.shard` is given) for one shard, `reduce`, or `all` (the default): every
    unfinished job, then the output."""
    t = cfg.task
    guard("prepare", cfg.output_dir, bool(cfg.overwrite))
    work = work_dir(cfg)
    claim_plan(work, plan_of(cfg, shards))
    stage = t.get("stage") or ("map" if t.get("shard") is not None else "all")
    if stage not in ("partition", "map", "reduce", "all"):
        raise DataError(f"task.stage must be partition, map, reduce or all, got {stage!r}")
    cfgd = OmegaConf.to_container(cfg, resolve=True)
    if stage == "partition":
        shard_jobs.partition_source(cfgd, str(work), shards)
        if not is_done(work / "source"):
            log.info("%s is not a folder of tables: the map jobs read it in place", cfg.data.path)
            return {"tables": {}}
        log.info("source tables read into %d shards in %s", shards, work / "source")
        return read_done(work / "source")
    if stage == "map":
        if t.get("shard") is None:
            raise DataError("task.stage=map runs one shard: give task.shard (a sweep: 'task.shard=range(0,N)')")
        k = int(t.shard)
        if not 0 <= k < shards:
            raise DataError(f"task.shard={k} is not one of the task.shards={shards} shards (0..{shards - 1})")
        if not is_done(work / "source") and shard_jobs.partitioned(cfg):
            raise DataError(
                f"{cfg.data.path} is a folder of OMOP tables: read them into shards once first, with the same "
                f"settings and task.stage=partition (else every shard job reads every table whole)"
            )
        shard_jobs.map_shard(cfgd, str(work), k, shards)
        log.info("prepared shard %d of %d in %s", k, shards, work)
        return read_done(work / "map" / str(k))
    return reduce(cfg, cfgd, work, shards)


def reduce(cfg: DictConfig, cfgd: dict, work: Path, shards: int) -> dict:
    """Run what is not done yet, stage by stage, then write the output (`shard_jobs.finish`)."""
    from cehrx.tasks.prepare import announce

    t = cfg.task
    workers = int(t.get("workers") or 1)
    split = shard_jobs.partitioned(cfg)
    stages = Stages(total=5 + split + (cfg.data.source == "omop"))
    start = time.perf_counter()
    if split:
        with stages(f"source tables into {shards} shards"):
            shard_jobs.partition_source(cfgd, str(work), shards)
    with Jobs(workers) as jobs:
        with stages(f"map {shards} shards"):
            jobs.run(shard_jobs.map_shard, [(cfgd, str(work), k, shards) for k in pending(work, "map", shards)])
        with stages("kept codes and value deciles"):
            shard_jobs.reduce_codes(cfgd, str(work), shards)
        meds: list = []
        if cfg.data.source == "omop":  # needs only the maps: in a pool, written beside the next stages
            with stages("MEDS copy" + (" (started)" if workers > 1 else "")):
                todo = [(cfgd, str(work), shards, s) for s in pending(work, "meds", SPLITS)]
                meds = jobs.start(shard_jobs.meds_split, todo)
        with stages("visits per shard and the vocabulary"):
            jobs.run(shard_jobs.visit_shard, [(cfgd, str(work), k) for k in pending(work, "visits", shards)])
            shard_jobs.reduce_vocab(cfgd, str(work), shards)
        with stages("tokenize shards"):
            jobs.run(shard_jobs.tokenize_shard, [(cfgd, str(work), k) for k in pending(work, "tokens", shards)])
        with task_output(cfg, "prepare") as tmp:
            with stages("token files, vocab.json, the MEDS copy's end"):
                report = shard_jobs.finish(cfg, work, shards, workers, tmp, lambda: jobs.wait(meds))
            report["timings_s"] = {**stages.timings, "total": round(time.perf_counter() - start, 3)}
            report["events"]["per_second"] = round(report["events"]["in"] / max(report["timings_s"]["total"], 1e-9))
            write_marker(tmp, "prepare", report)
    if not t.get("keep_work"):
        shutil.rmtree(work, ignore_errors=True)
    announce(report, Path(str(cfg.output_dir)))
    return report


def pending(work: Path, stage: str, shards: int | tuple[str, ...]) -> list:
    """The shards (or splits) whose `stage` job has no marker yet; what killed jobs of the stage left is removed."""
    keys = range(shards) if isinstance(shards, int) else shards
    for k in keys:
        recover(work / stage / str(k), DONE)
    return [k for k in keys if not is_done(work / stage / str(k))]


class Jobs:
    """Runs shard jobs: in this process for one worker, else in one pool of spawned processes kept for
    every stage (fork would copy DuckDB's threads and locks; a process starts in seconds). The first
    failure cancels the jobs that have not started and is raised."""

    def __init__(self, workers: int) -> None:
        self.workers = workers
        self.pool: ProcessPoolExecutor | None = None

    def __enter__(self) -> "Jobs":
        return self

    def __exit__(self, *exc) -> None:
        if self.pool is not None:
            self.pool.shutdown(wait=True, cancel_futures=True)

    def run(self, fn, jobs: list[tuple]) -> None:
        self.wait(self.start(fn, jobs))

    def start(self, fn, jobs: list[tuple]) -> list[Future]:
        """Queue the jobs and return at once (in this process: run them now); `wait` for them later."""
        if self.workers <= 1:
            for job in jobs:
                fn(*job)
            return []
        if self.pool is None and jobs:
            self.pool = ProcessPoolExecutor(max_workers=self.workers, mp_context=mp.get_context("spawn"))
        return [self.pool.submit(fn, *job) for job in jobs]

    def wait(self, futures: list[Future]) -> None:
        try:
            for f in futures:
                f.result()
        except BaseException:
            for f in futures:
                f.cancel()
            raise
