"""The sharded prepare's MEDS copy: each subject shard writes its rows of every split in the total order
(`write_part`, in the shard's `map` job), and `gather_split` merges the shards' parts of a split into the
single pass's `data/<split>/0.parquet` (one job per split, so the splits are written in parallel).

No sort of the rows: a part holds its shard's rows in (subject_id, time, ...) order and a subject's rows
are in one part only, so the file's order is a merge of the parts by subject. The subjects' runs of rows
in every part (one entry per subject, numpy) ordered by subject_id place every part row in the file; rows
then go out a row group at a time: each part's next rows for that group (a contiguous range, the parts
read as streams) are put in place with one `take`, while the writer thread encodes the group before.
Memory: a batch of every part, the group being assembled and two being written. (A DuckDB sort of all
the parts' rows, which this replaces, spilled 100 M rows to disk and took most of the final write.)
The files are `meds.write_split_files`'s: byte for byte the single pass's.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Iterator

import duckdb
import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from cehrx.export.meds import SplitWriters, split_tables, write_split_files

BATCH = 1 << 18  # rows per row group of a part, and per batch read back: what a part's reader holds


def write_part(con: duckdb.DuckDBPyConnection, folder: Path, batch_rows: int = 1_000_000) -> dict[str, int]:
    """One subject shard's MEDS rows in the total order: `folder/<split>.parquet` for each split with rows.
    Returns the rows per split."""
    folder.mkdir(parents=True, exist_ok=True)
    rows: dict[str, int] = {}
    writers: dict[str, pq.ParquetWriter] = {}
    try:
        for split, table in split_tables(con, batch_rows):
            if split not in writers:
                writers[split] = pq.ParquetWriter(folder / f"{split}.parquet", table.schema, compression="zstd")
            writers[split].write_table(table, row_group_size=BATCH)
            rows[split] = rows.get(split, 0) + table.num_rows
    finally:
        for w in writers.values():
            w.close()
    return rows


@dataclass
class Runs:
    """One part's subjects, in its order: where each one's rows start in the part (`local`, with the
    part's size last) and in the file (`place`)."""

    local: np.ndarray
    place: np.ndarray

    def before(self, g: int) -> int:
        """How many of the part's rows go before row `g` of the file."""
        i = int(np.searchsorted(self.place, g, side="right")) - 1
        return 0 if i < 0 else int(self.local[i] + min(self.local[i + 1] - self.local[i], g - self.place[i]))

    def places(self, a: int, b: int) -> np.ndarray:
        """The file rows of the part's rows a..b-1."""
        r = np.arange(a, b, dtype=np.int64)
        i = np.searchsorted(self.local, r, side="right") - 1
        return self.place[i] + r - self.local[i]


def merge_runs(parts: list[Path]) -> tuple[list[Runs], int]:
    """Each part's `Runs`, its subjects ordered by subject_id across the parts, and the rows of all."""
    starts, ids = [], []
    for p in parts:
        sid = pq.read_table(p, columns=["subject_id"]).column(0).to_numpy()
        if (np.diff(sid) < 0).any():
            raise RuntimeError(f"{p}: its subjects are out of order")
        first = np.flatnonzero(np.diff(sid, prepend=sid[:1] - 1))
        starts.append(np.append(first, len(sid)))
        ids.append(sid[first])
    n = np.concatenate([np.diff(s) for s in starts])
    order = np.argsort(np.concatenate(ids), kind="stable")
    place = np.empty(len(n), np.int64)
    place[order] = np.cumsum(n[order]) - n[order]
    cuts = np.cumsum([0] + [len(i) for i in ids])
    return [Runs(s, place[a:b]) for s, a, b in zip(starts, cuts[:-1], cuts[1:])], int(n.sum())


class PartReader:
    """A part's rows as a stream: `take(n)` returns its next n rows."""

    def __init__(self, path: Path, schema: pa.Schema) -> None:
        self.schema = schema
        self.batches = pq.ParquetFile(path).iter_batches(batch_size=BATCH)
        self.buffer = schema.empty_table()

    def take(self, n: int) -> pa.Table:
        pieces = []
        while n > 0:
            if not self.buffer.num_rows:
                self.buffer = pa.Table.from_batches([next(self.batches)]).cast(self.schema)
            pieces.append(self.buffer.slice(0, n))
            self.buffer = self.buffer.slice(pieces[-1].num_rows)
            n -= pieces[-1].num_rows
        return pa.concat_tables(pieces) if pieces else self.schema.empty_table()


def gather_split(parts: list[Path], split: str, data: Path) -> int:
    """`data/<split>/0.parquet` from the shards' parts of `split` (`write_part`; shards without rows of it
    have none): the single pass's rows, order and row groups. Returns its rows."""
    parts = [p for p in parts if p.is_file()]
    if not parts:
        return write_split_files(data, iter(()), (split,))
    schema = pq.read_schema(parts[0])
    runs, total = merge_runs(parts)
    readers = [PartReader(p, schema) for p in parts]
    group = SplitWriters.ROW_GROUP

    def tables() -> Iterator[tuple[str, pa.Table]]:
        for g0 in range(0, total, group):
            g1 = min(g0 + group, total)
            ranges = [(r.before(g0), r.before(g1)) for r in runs]
            table = pa.concat_tables([rd.take(b - a) for rd, (a, b) in zip(readers, ranges)])
            perm = np.empty(g1 - g0, np.int64)
            perm[np.concatenate([r.places(a, b) for r, (a, b) in zip(runs, ranges)]) - g0] = np.arange(g1 - g0)
            yield split, table.take(pa.array(perm))

    return write_split_files(data, tables(), (split,))
