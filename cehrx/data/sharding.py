"""Subject shards for preparing data of any size: which subject goes where, how many shards, and
idempotent shard jobs (DESIGN §4.1, "Prepare at any size").

A subject's shard is a stable hash of its id (`shard_sql`, mirrored by `shard_of` in numpy), so
every job of a run, on any node, sends the rows of a subject to the same shard without asking
anyone, and a subject's rows never straddle two shards: everything prepare does per subject
(events, visits, tokens) is shard-local. Rows whose subject id is missing or does not parse
belong to shard 0, so they are counted (as dropped) exactly once.

A job writes its results into a temporary sibling and renames it into place with a `done.json`
marker last (`atomic.atomic_dir`): a directory that exists with its marker is complete, one
without does not exist, so a rerun after a kill redoes exactly the jobs that are not done.
"""

from __future__ import annotations

import hashlib
import json
import math
import os
import re
import resource
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator

import numpy as np

from cehrx.data.atomic import atomic_dir, write_text
from cehrx.errors import DataError

# The hash: the id's two 32-bit halves times two multipliers < 2**30, summed modulo the prime 2**31 - 1.
# Every product stays below 2**62, so it is exact in BIGINT (SQL) and int64 (numpy), and cheap: a map job
# evaluates it on every source row to find its shard's (about 0.04 us a row; a HUGEINT product modulo a
# 64-bit prime, the first version, took 1 us, more than the rest of reading a parquet row).
_A, _B, _PRIME = 0x2545F491, 0x1B873593, 2**31 - 1
HASH_VERSION = 2  # in the work dir's fingerprint: shards of another hash are never mixed in
DONE = "done.json"
# Peak bytes of one worker per event of its shard (DuckDB share + the numpy arrays of tokenization);
# conservative against the measured ~200 B/event of a single pass (Synthea 20k: 31 M events, 6 GiB).
BYTES_PER_EVENT = 400
DUCKDB_SHARE = 0.5  # of a worker's memory budget, for DuckDB's memory_limit (it spills beyond it)


def shard_sql(subject: str, shards: int) -> str:
    """SQL: the shard (0..shards-1) of a subject id expression; ids that are NULL or not integers -> 0.

    >>> shard_sql('"person_id"', 4)[:40]
    'coalesce(CAST((((TRY_CAST("person_id" AS'
    """
    x = f"TRY_CAST({subject} AS BIGINT)"
    mixed = f"((({x} & 4294967295) * {_A} + (({x} >> 32) & 4294967295) * {_B}) % {_PRIME})"
    return f"coalesce(CAST({mixed} % {int(shards)} AS INTEGER), 0)"


def shard_of(ids: np.ndarray, shards: int) -> np.ndarray:
    """`shard_sql` in numpy (the same exact int64 arithmetic), for tests and tools.

    >>> shard_of(np.array([1, 2, 2**32]), 7).tolist() == [_A % _PRIME % 7, 2 * _A % _PRIME % 7, _B % _PRIME % 7]
    True
    """
    x = np.asarray(ids, dtype=np.int64)
    return ((x & 0xFFFFFFFF) * _A + ((x >> 32) & 0xFFFFFFFF) * _B) % _PRIME % shards


@dataclass(frozen=True)
class Shard:
    """Shard `index` of `count`: `where(column)` is the SQL predicate selecting its rows."""

    index: int
    count: int

    def where(self, subject: str) -> str:
        return f"{shard_sql(subject, self.count)} = {int(self.index)}"


def parse_bytes(text: str | int | None) -> int | None:
    """`4GB`, `512MiB`, `2.5 GB` -> bytes (powers of 1000 for kB/MB/GB, 1024 for KiB/MiB/GiB).

    >>> parse_bytes("4GB"), parse_bytes("1GiB"), parse_bytes(None)
    (4000000000, 1073741824, None)
    """
    if text is None or isinstance(text, int):
        return text
    m = re.fullmatch(r"\s*([\d.]+)\s*([kKmMgGtT]?)(i?)[bB]?\s*", str(text))
    if not m:
        raise DataError(f"not a memory size: {text!r} (write e.g. 4GB or 512MiB)")
    power = " KMGT".index(m.group(2).upper() or " ")
    return int(float(m.group(1)) * (1024 if m.group(3) else 1000) ** power)


def duckdb_limit(budget: int) -> str:
    """DuckDB's memory_limit for a worker with `budget` bytes: its share, in MB."""
    return f"{max(64, int(budget * DUCKDB_SHARE / 1e6))}MB"


def choose_shards(events: int, budget: int, workers: int) -> int:
    """Shards for `events` source rows: 1 (the single pass) when one worker's budget holds them all,
    else enough that each shard fits a budget, and at least one per worker.

    >>> choose_shards(1_000_000, 4 * 10**9, 16), choose_shards(100_000_000, 4 * 10**9, 4), choose_shards(10**8, 4 * 10**9, 16)
    (1, 10, 16)
    """
    need = math.ceil(events * BYTES_PER_EVENT / max(budget, 1))
    return 1 if need <= 1 else max(need, workers)


def fingerprint(settings: dict) -> str:
    """A short digest of the settings a shard's results depend on: a work dir of other settings is refused."""
    return hashlib.sha256(json.dumps(settings, sort_keys=True, default=str).encode()).hexdigest()[:16]


def is_done(job_dir: Path) -> bool:
    return (job_dir / DONE).is_file()


def read_done(job_dir: Path) -> dict:
    return json.loads((job_dir / DONE).read_text())


@contextmanager
def job(job_dir: Path) -> Iterator[Path]:
    """A temporary directory that becomes `job_dir` when the block ends; the block writes `DONE` last."""
    with atomic_dir(job_dir, DONE, overwrite=False) as tmp:
        yield tmp
        if not (tmp / DONE).is_file():
            raise RuntimeError(f"shard job {job_dir} ended without its marker")


def write_done(tmp: Path, result: dict) -> None:
    """The job's marker: its result, and the peak RSS of its process so far (a pool worker runs several
    jobs: an upper bound for this one), which the benchmark holds to the memory budget."""
    (tmp / DONE).write_text(
        json.dumps({**result, "peak_rss_mib": round(peak_rss_mib())}, indent=1, default=_jsonable) + "\n"
    )


def peak_rss_mib() -> float:
    """This process's peak resident memory (Linux: `VmHWM`). Not `ru_maxrss`: Linux carries it over
    fork and exec, so a spawned pool worker would report at least its parent's peak at the spawn."""
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) / 1024  # kB
    except (OSError, ValueError, IndexError):
        pass
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # KiB on Linux


def _jsonable(x):
    return x.item() if isinstance(x, np.generic) else str(x)


def claim_plan(work: Path, plan: dict) -> dict:
    """Write `work/plan.json`, or check that the one there has the same settings (every job of a run
    writes the same plan, so concurrent writers agree); refuse a work dir of other settings."""
    path = work / "plan.json"
    if path.is_file():
        old = json.loads(path.read_text())
        if old != plan:
            raise DataError(
                f"{work} holds shards of other settings ({old.get('shards')} shards, fingerprint "
                f"{old.get('fingerprint')}, now {plan['shards']} / {plan['fingerprint']}; or made by another cehrx "
                "version): remove it, or rerun with the settings it was made with"
            )
        return old
    work.mkdir(parents=True, exist_ok=True)
    write_text(path, json.dumps(plan, indent=1, sort_keys=True) + "\n")
    return plan


def worker_threads(workers: int) -> int:
    """DuckDB threads per worker: the cores this process may use (a SLURM job's, not the whole node's)
    shared among the workers."""
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()
    return max(1, (cores or 1) // max(workers, 1))
