"""Write the token rows as per-split parquet shards (format in `cehrx.data.shards`)."""

from __future__ import annotations

from pathlib import Path

import duckdb
import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from cehrx.data.shards import SHARD_SCHEMA, SPLITS


def build_sequences(con: duckdb.DuckDBPyConnection) -> None:
    """`seqs(subject_id, split, tokens, times, birth_time, n_tokens)`, one row per subject."""
    con.execute("""
        CREATE OR REPLACE TABLE seqs AS
        SELECT s.subject_id, d.split,
               CAST(s.tokens AS INTEGER[]) AS tokens, s.times,
               CAST(epoch(d.birth_ok) AS BIGINT) AS birth_time, CAST(len(s.tokens) AS INTEGER) AS n_tokens
        FROM (
            SELECT subject_id, list(id ORDER BY r, part, er, sub) AS tokens,
                   list(CAST(epoch(t) AS BIGINT) ORDER BY r, part, er, sub) AS times
            FROM tok_ids GROUP BY subject_id
        ) s JOIN demo_t d USING (subject_id)
    """)


def write_shards(con: duckdb.DuckDBPyConnection, out_dir: Path, subjects_per_shard: int) -> dict[str, int]:
    """Write tokens/<split>/<n>.parquet ordered by subject_id; return subjects per split."""
    written: dict[str, int] = {}
    for split in SPLITS:
        d = out_dir / "tokens" / split
        d.mkdir(parents=True, exist_ok=True)
        n = con.execute("SELECT count(*) FROM seqs WHERE split = ?", [split]).fetchall()[0][0]
        written[split] = n
        for shard, offset in enumerate(range(0, max(n, 1), subjects_per_shard)):
            table = con.sql(
                "SELECT subject_id, tokens, times, birth_time, n_tokens FROM seqs WHERE split = ? ORDER BY subject_id LIMIT ? OFFSET ?",
                params=[split, subjects_per_shard, offset],
            ).to_arrow_table()
            table = table.cast(SHARD_SCHEMA)
            pq.write_table(table, d / f"{shard}.parquet", compression="zstd", row_group_size=2048)
    return written


def length_percentiles(con: duckdb.DuckDBPyConnection) -> dict[str, float]:
    lengths = np.array([r[0] for r in con.execute("SELECT n_tokens FROM seqs").fetchall()])
    if not len(lengths):
        return {}
    qs = {"p50": 50, "p90": 90, "p99": 99, "max": 100}
    return {"mean": round(float(lengths.mean()), 1), **{k: float(np.percentile(lengths, q)) for k, q in qs.items()}}
