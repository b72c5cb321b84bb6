"""Write a MEDS 0.4 dataset (validated with the `meds` schemas) from the `events` table.

Rows go out in one total order, (split, subject_id, time NULLS FIRST, code, numeric_value,
text_value, table, visit_id, visit_end, unit, omop_concept_id), so the files are deterministic.
Sorting 9M rows by that wide key (strings included) with the full payload is DuckDB's slowest
step here, so it is done in two cheaper parts that give the same order:

1. DuckDB sorts by three integers only, (subject rank, time, code rank), the ranks numbering
   subjects in (split, subject_id) order and codes in code order, and returns narrow columns:
   codes and table names come back as integer ranks and are turned into strings by Arrow.
2. Rows that tie on those three keys (rare: the same code at the same time) are put in order
   by the remaining keys with Arrow's stable sort, group by group.
"""

from __future__ import annotations

import json
from concurrent.futures import Future, ThreadPoolExecutor
from datetime import UTC, datetime
from pathlib import Path
from typing import Iterable, Iterator, Self

import duckdb
import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq
from meds import (
    CodeMetadataSchema,
    DataSchema,
    DatasetMetadataSchema,
    SubjectSplitSchema,
)

import cehrx
from cehrx.data.shards import SPLITS

EXTENSION_COLUMNS = ("table", "visit_id", "visit_end", "unit", "omop_concept_id")
# The keys after (subject, time, code) in the total order, as columns of `ordered_batches`.
TIE_KEYS = ("value_key", "text_value", "table_rank", "visit_id", "visit_end", "unit", "omop_concept_id")
OUT_COLUMNS = (
    "subject_id",
    "time",
    "code",
    "numeric_value",
    "text_value",
    "table",
    "visit_id",
    "visit_end",
    "unit",
    "omop_concept_id",
)


def write_meds(con: duckdb.DuckDBPyConnection, root: Path, dataset_name: str, batch_rows: int = 1_000_000) -> int:
    """`root/data/<split>/0.parquet`, `metadata/{codes,subject_splits}.parquet`, `metadata/dataset.json`.

    Rows are sorted by (subject_id, time) with static rows first, as MEDS expects.
    """
    total = write_data(con, root / "data", batch_rows)
    write_metadata(con, root, dataset_name)
    return total


def write_metadata(con: duckdb.DuckDBPyConnection, root: Path, dataset_name: str) -> None:
    """`metadata/`: codes (from `code_meta`), subject splits (from `subject_split`) and dataset.json."""
    meta = root / "metadata"
    meta.mkdir(parents=True, exist_ok=True)
    codes = con.sql("""
        SELECT code, description, [] :: VARCHAR[] AS parent_codes, omop_concept_id, omop_domain FROM code_meta ORDER BY code
    """).to_arrow_table()
    codes = CodeMetadataSchema.align(codes)
    CodeMetadataSchema.validate(codes)
    pq.write_table(codes, meta / "codes.parquet")
    splits = con.sql("SELECT subject_id, split FROM subject_split ORDER BY subject_id").to_arrow_table()
    pq.write_table(SubjectSplitSchema.align(splits), meta / "subject_splits.parquet")
    info = {
        "dataset_name": dataset_name,
        "dataset_version": "unknown",
        "etl_name": "cehrx",
        "etl_version": cehrx.__version__,
        "meds_version": "0.4.1",
        "created_at": datetime.now(UTC).isoformat(),
        "raw_source_id_columns": ["visit_id", "omop_concept_id"],
        "code_modifier_columns": ["unit"],
    }
    DatasetMetadataSchema.validate(info)
    (meta / "dataset.json").write_text(json.dumps(info, indent=2) + "\n")


def write_data(con: duckdb.DuckDBPyConnection, data: Path, batch_rows: int) -> int:
    """`data/<split>/0.parquet` for every split (an empty split still gets a valid, typed file)."""
    return write_split_files(data, split_tables(con, batch_rows))


def split_tables(con: duckdb.DuckDBPyConnection, batch_rows: int) -> Iterator[tuple[str, pa.Table]]:
    """(split, MEDS rows) in the total order, batch by batch, from `events` and `subject_split`."""
    splits, codes, tables = rank_tables(con)
    for batch in ordered_batches(con, batch_rows):
        for split, part in split_parts(batch, splits):
            yield split, meds_table(part, codes, tables)
    con.execute("DROP TABLE _meds_subjects; DROP TABLE _meds_codes; DROP TABLE _meds_tables")


def write_split_files(data: Path, parts: Iterable[tuple[str, pa.Table]], splits: tuple[str, ...] = SPLITS) -> int:
    """Write (split, rows) in order into `data/<split>/0.parquet`; each of `splits` without rows gets an
    empty, typed file."""
    total = 0
    with SplitWriters(data) as writers:
        for split, table in parts:
            writers.add(split, table)
            total += table.num_rows
        written = set(writers.buffers)
    for split in splits:
        d = data / split
        if split not in written:
            d.mkdir(parents=True, exist_ok=True)
            pq.write_table(empty_meds(), d / "0.parquet")
        DataSchema.validate(pq.read_schema(d / "0.parquet"))
    return total


def empty_meds() -> pa.Table:
    no_strings = pa.array([], pa.string())
    return meds_table(ORDERED_SCHEMA.empty_table(), no_strings, no_strings)


class SplitWriters:
    """One parquet file per split, written by a background thread while the next rows are sorted.

    Rows are buffered and written in row groups of exactly `ROW_GROUP` rows (the last one
    shorter), so the bytes depend on the rows only, not on how DuckDB happened to batch them;
    large row groups also encode faster and smaller than one per batch. At most `QUEUE` row groups
    wait for the writer: a producer faster than the encoding (the sharded gather) waits instead of
    holding every row in memory.
    """

    ROW_GROUP = 1 << 20
    QUEUE = 2

    def __init__(self, data: Path) -> None:
        self.data = data
        self.buffers: dict[str, list[pa.Table]] = {}
        self.rows: dict[str, int] = {}
        self.writers: dict[str, pq.ParquetWriter] = {}
        self.pool = ThreadPoolExecutor(max_workers=1)
        self.pending: list[Future] = []

    def __enter__(self) -> Self:
        return self

    def add(self, split: str, table: pa.Table) -> None:
        self.buffers.setdefault(split, []).append(table)
        self.rows[split] = self.rows.get(split, 0) + table.num_rows
        if self.rows[split] >= self.ROW_GROUP:
            self.flush(split, final=False)

    def flush(self, split: str, final: bool) -> None:
        """Write the buffered row groups of `split` (all rows when `final`, else only full groups)."""
        if not self.buffers[split]:
            return
        table = pa.concat_tables(self.buffers[split])
        n = table.num_rows if final else table.num_rows - table.num_rows % self.ROW_GROUP
        self.buffers[split] = [table.slice(n)] if n < table.num_rows else []
        self.rows[split] = table.num_rows - n
        if n or split not in self.writers:
            while len(self.pending) >= self.QUEUE:
                self.pending.pop(0).result()
            self.pending.append(self.pool.submit(self.write, split, table.slice(0, n)))

    def write(self, split: str, table: pa.Table) -> None:
        if split not in self.writers:
            (self.data / split).mkdir(parents=True, exist_ok=True)
            self.writers[split] = pq.ParquetWriter(self.data / split / "0.parquet", table.schema, compression="zstd")
        self.writers[split].write_table(table, row_group_size=self.ROW_GROUP)

    def __exit__(self, exc_type, *_) -> None:
        try:
            if exc_type is None:
                for split in list(self.buffers):
                    self.flush(split, final=True)
            for f in self.pending:
                f.result()
        finally:
            self.pool.shutdown(wait=True)
            for w in self.writers.values():
                w.close()


def rank_tables(con: duckdb.DuckDBPyConnection) -> tuple[list[tuple[str, int]], pa.Array, pa.Array]:
    """Number subjects in (split, subject_id) order, and codes and table names in string order.

    Returns each split with the first subject rank after it, and the code and table strings
    indexed by their rank (the Arrow side turns ranks back into strings with `take`).
    """
    con.execute("""
        CREATE OR REPLACE TEMP TABLE _meds_subjects AS
        SELECT subject_id, split, CAST(row_number() OVER (ORDER BY split, subject_id) - 1 AS INTEGER) AS srank FROM subject_split
    """)
    # the codes and table names of `events` itself (code_meta may not list them all in every caller)
    con.execute("""
        CREATE OR REPLACE TEMP TABLE _meds_codes AS
        SELECT code, CAST(row_number() OVER (ORDER BY code) - 1 AS INTEGER) AS crank FROM (SELECT DISTINCT code FROM events WHERE code IS NOT NULL)
    """)
    con.execute("""
        CREATE OR REPLACE TEMP TABLE _meds_tables AS
        SELECT src_table, CAST(row_number() OVER (ORDER BY src_table) - 1 AS INTEGER) AS trank
        FROM (SELECT DISTINCT src_table FROM events WHERE src_table IS NOT NULL)
    """)
    splits = [
        (s, int(n))
        for s, n in con.execute(
            "SELECT split, max(srank) + 1 FROM _meds_subjects GROUP BY split ORDER BY split"
        ).fetchall()
    ]
    codes = con.sql("SELECT code FROM _meds_codes ORDER BY crank").to_arrow_table().column(0).combine_chunks()
    tables = con.sql("SELECT src_table FROM _meds_tables ORDER BY trank").to_arrow_table().column(0).combine_chunks()
    return splits, codes, tables


ORDERED_SCHEMA = pa.schema(
    [
        ("srank", pa.int32()),
        ("subject_id", pa.int64()),
        ("time", pa.timestamp("us")),
        ("code_rank", pa.int32()),
        ("numeric_value", pa.float32()),
        ("value_key", pa.float64()),
        ("text_value", pa.string()),
        ("table_rank", pa.int32()),
        ("visit_id", pa.int64()),
        ("visit_end", pa.timestamp("us")),
        ("unit", pa.string()),
        ("omop_concept_id", pa.int64()),
    ]
)


def ordered_batches(con: duckdb.DuckDBPyConnection, batch_rows: int):
    """Batches of events in the total order; rows tying on the three sort keys never straddle two batches."""
    reader = con.sql("""
        SELECT s.srank, e.subject_id, e.time, c.crank AS code_rank, CAST(e.numeric_value AS FLOAT) AS numeric_value,
               e.numeric_value AS value_key, e.text_value, t.trank AS table_rank, e.visit_id, e.visit_end, e.unit, e.omop_concept_id
        FROM events e JOIN _meds_subjects s USING (subject_id)
        LEFT JOIN _meds_codes c USING (code) LEFT JOIN _meds_tables t USING (src_table)
        ORDER BY s.srank, e.time NULLS FIRST, c.crank
    """).to_arrow_reader(batch_rows)
    carry = None
    for batch in reader:
        table = (
            pa.Table.from_batches([batch])
            if carry is None
            else pa.concat_tables([carry, pa.Table.from_batches([batch])])
        )
        # hold back the rows that tie with the last one: the next batch may continue their group
        tie = ties_previous(table)
        same = np.flatnonzero(~tie)
        cut = int(same[-1]) if len(same) else 0
        if cut:
            yield resolve_ties(table.slice(0, cut), tie[:cut])
        carry = table.slice(cut)
    if carry is not None and carry.num_rows:
        yield resolve_ties(carry)


def ties_previous(table: pa.Table) -> np.ndarray:
    """Per row: equal to the row before on (srank, time, code_rank), nulls equal to nulls (row 0: False)."""
    n = table.num_rows
    out = np.zeros(n, dtype=bool)
    if n < 2:
        return out
    out[1:] = True
    for name in ("srank", "time", "code_rank"):
        col = table.column(name)
        a, b = col.slice(1), col.slice(0, n - 1)
        eq = pc.fill_null(pc.equal(a, b), False).to_numpy(zero_copy_only=False)
        both_null = np.asarray(pc.and_(pc.is_null(a), pc.is_null(b)))
        out[1:] &= eq | both_null
    return out


def resolve_ties(table: pa.Table, tie: np.ndarray | None = None) -> pa.Table:
    """Order the rows of each tie group by the remaining keys (ascending, nulls last, as DuckDB does).

    `tie` is `ties_previous(table)` when the caller has it already.
    """
    tie = ties_previous(table) if tie is None else tie
    if not tie.any():
        return table
    member = tie.copy()
    member[:-1] |= tie[1:]  # the first row of a group ties with the next one
    rows = np.flatnonzero(member)
    group = np.cumsum(~tie[rows])  # groups are contiguous runs of member rows
    keys = table.take(pa.array(rows)).select(list(TIE_KEYS)).append_column("_group", pa.array(group))
    order = pc.sort_indices(keys, sort_keys=[(k, "ascending", "at_end") for k in ("_group", *TIE_KEYS)]).to_numpy()
    if (order[1:] > order[:-1]).all():  # already in order
        return table
    perm = np.arange(table.num_rows)
    perm[rows] = rows[order]
    return table.take(pa.array(perm))


def split_parts(table: pa.Table, splits: list[tuple[str, int]]):
    """(split, rows of that split): subjects are ranked split by split, so each split is one slice."""
    ranks = table.column("srank").to_numpy()
    start = 0
    for split, end in splits:
        stop = int(np.searchsorted(ranks, end, side="left"))
        if stop > start:
            yield split, table.slice(start, stop - start)
        start = stop


def meds_table(part: pa.Table, codes: pa.Array, tables: pa.Array) -> pa.Table:
    """The MEDS columns (ranks turned back into code and table strings), aligned to `DataSchema`."""
    cols = {
        "subject_id": part.column("subject_id"),
        "time": part.column("time"),
        "code": codes.take(part.column("code_rank")),
        "numeric_value": part.column("numeric_value"),
        "text_value": part.column("text_value"),
        "table": tables.take(part.column("table_rank")),
        "visit_id": part.column("visit_id"),
        "visit_end": part.column("visit_end"),
        "unit": part.column("unit"),
        "omop_concept_id": part.column("omop_concept_id"),
    }
    return DataSchema.align(pa.table({k: cols[k] for k in OUT_COLUMNS}))
