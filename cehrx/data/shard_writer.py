"""Write the token sequences as per-split parquet shards (format in `cehrx.data.shards`).

Subjects arrive in (split, subject_id) order (`token_order.Ordered`), so every shard is a
contiguous range of subjects: each is assembled, counted (train only) and written on its own,
which keeps memory to a few shards' tokens; two shards are made at once by threads (numpy and
parquet encoding release the GIL).
The list columns are written without parquet dictionaries: dictionary pages of token ids and
times cost ~30% more encoding time and make larger files than plain zstd pages.
"""

from __future__ import annotations

from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from cehrx.data.shards import SHARD_SCHEMA, SPLITS
from cehrx.data.token_order import Ordered
from cehrx.data.tokenize import TokenIds, assemble


@dataclass
class Written:
    """What write_shards produced: subjects per split, lengths, and train counts per token id."""

    per_split: dict[str, int]
    lengths: np.ndarray  # tokens per subject, all splits
    counts: np.ndarray  # train occurrences per token id
    subjects: np.ndarray  # train subjects per token id

    @property
    def tokens(self) -> int:
        return int(self.lengths.sum())


def shard_table(o: Ordered, ids: TokenIds, s0: int, s1: int) -> tuple[pa.Table, np.ndarray]:
    """One shard of subjects s0..s1-1 as a SHARD_SCHEMA table, plus its flat token ids."""
    tok, tim, lengths = assemble(o, ids, s0, s1)
    offsets = pa.array(np.concatenate([[0], np.cumsum(lengths)]).astype(np.int32))
    table = pa.Table.from_arrays(
        [
            pa.array(o.subject_id[s0:s1], pa.int64()),
            pa.ListArray.from_arrays(offsets, pa.array(tok, pa.int32())),
            pa.ListArray.from_arrays(offsets, pa.array(tim, pa.int64())),
            o.birth_s.slice(s0, s1 - s0),
            pa.array(lengths.astype(np.int32), pa.int32()),
        ],
        schema=SHARD_SCHEMA,
    )
    return table, tok


def subjects_per_token(o: Ordered, tok: np.ndarray, lengths: np.ndarray, n_vocab: int) -> np.ndarray:
    """How many of these subjects have each token id (a subjects x vocab bitmap, in slices)."""
    out = np.zeros(n_vocab, dtype=np.int64)
    ends = np.cumsum(lengths)
    starts = ends - lengths
    step = max(1, (1 << 26) // max(n_vocab, 1))
    for a in range(0, len(lengths), step):
        b = min(a + step, len(lengths))
        seen = np.zeros((b - a, n_vocab), dtype=bool)
        rows = np.repeat(np.arange(b - a), lengths[a:b])
        seen[rows, tok[starts[a] : ends[b - 1]]] = True
        out += seen.sum(axis=0)
    return out


def write_shards(
    o: Ordered, ids: TokenIds, out_dir: Path, subjects_per_shard: int, n_vocab: int, threads: int = 2
) -> Written:
    """Write tokens/<split>/<n>.parquet (subject_id order, `subjects_per_shard` rows each)."""
    split_start = np.searchsorted(o.split, np.arange(len(SPLITS) + 1))
    per_split, jobs = {}, []
    for i, split in enumerate(SPLITS):
        d = out_dir / "tokens" / split
        d.mkdir(parents=True, exist_ok=True)
        a, b = int(split_start[i]), int(split_start[i + 1])
        per_split[split] = b - a
        for shard, s0 in enumerate(range(a, max(b, a + 1), subjects_per_shard)):
            jobs.append((s0, min(s0 + subjects_per_shard, b), split == "train", d / f"{shard}.parquet"))
    return write_jobs(o, ids, jobs, per_split, n_vocab, threads)


def write_parts(o: Ordered, ids: TokenIds, out_dir: Path, firsts: dict[str, list[int]], n_vocab: int) -> Written:
    """One subject shard's part of each output file: `out_dir/<split>/<n>.parquet` holds its subjects of
    output file n, whose first subject_id is `firsts[split][n]` (the files `write_shards` would write for
    all subjects). Its subjects are in (split, subject_id) order, so each part is a contiguous range."""
    split_start = np.searchsorted(o.split, np.arange(len(SPLITS) + 1))
    per_split, jobs = {}, []
    for i, split in enumerate(SPLITS):
        a, b = int(split_start[i]), int(split_start[i + 1])
        per_split[split] = b - a
        if a == b:
            continue
        (out_dir / split).mkdir(parents=True, exist_ok=True)
        file = np.searchsorted(np.asarray(firsts[split], dtype=np.int64), o.subject_id[a:b], side="right") - 1
        cuts = np.flatnonzero(np.diff(file)) + 1
        for s0, s1 in zip(np.concatenate([[0], cuts]), np.concatenate([cuts, [b - a]])):
            jobs.append((a + int(s0), a + int(s1), split == "train", out_dir / split / f"{int(file[s0])}.parquet"))
    return write_jobs(o, ids, jobs, per_split, n_vocab, threads=1)


def write_jobs(
    o: Ordered, ids: TokenIds, jobs: list[tuple], per_split: dict[str, int], n_vocab: int, threads: int
) -> Written:
    """Write each job's subjects (s0, s1, train, path) as one parquet file, counting train tokens.

    Jobs are independent, so `threads` of them are assembled, counted and written at once (numpy and
    parquet release the GIL); results are combined in job order.
    """

    def one(job: tuple) -> tuple[np.ndarray, np.ndarray | None, np.ndarray | None]:
        s0, s1, train, path = job
        table, tok = shard_table(o, ids, s0, s1)
        n = table.column("n_tokens").to_numpy()
        counted = (
            (np.bincount(tok, minlength=n_vocab), subjects_per_token(o, tok, n, n_vocab)) if train else (None, None)
        )
        write_table(table, path)
        return n, *counted

    counts = np.zeros(n_vocab, dtype=np.int64)
    subjects = np.zeros(n_vocab, dtype=np.int64)
    lengths = []
    with ThreadPoolExecutor(max_workers=max(1, threads)) as pool:
        for n, c, u in pool.map(one, jobs):  # map keeps memory to ~threads shards and yields in order
            lengths.append(n)
            if c is not None:
                counts += c
                subjects += u
    return Written(
        per_split, np.concatenate(lengths).astype(np.int64) if lengths else np.zeros(0, np.int64), counts, subjects
    )


def write_table(table: pa.Table, path: Path) -> None:
    """A token shard file; the one writer of both paths, so equal tables give equal bytes."""
    pq.write_table(table, path, compression="zstd", row_group_size=2048, use_dictionary=False)


def length_percentiles(lengths: np.ndarray) -> dict[str, float]:
    if not len(lengths):
        return {}
    qs = {"p50": 50, "p90": 90, "p99": 99, "max": 100}
    return {"mean": round(float(lengths.mean()), 1), **{k: float(np.percentile(lengths, q)) for k, q in qs.items()}}
