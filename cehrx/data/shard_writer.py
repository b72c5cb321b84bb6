"""Write the token rows as per-split parquet shards (format in `cehrx.data.shards`)."""

from __future__ import annotations

from pathlib import Path

import duckdb
import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from cehrx.data.shards import SHARD_SCHEMA, SPLITS


def build_sequences(con: duckdb.DuckDBPyConnection) -> None:
    """`seqs(subject_id, split, tokens, times, birth_time, n_tokens, rn)`, one row per subject.

    `rn` is the subject's 0-based rank by subject_id inside its split (shards are rn ranges).
    One ordered aggregate of (id, time) pairs sorts each subject's tokens once, not once per list.
    """
    con.execute("""
        CREATE OR REPLACE TABLE seqs AS
        SELECT s.subject_id, d.split,
               list_transform(s.l, lambda x: x.id) AS tokens, list_transform(s.l, lambda x: x.t) AS times,
               CAST(epoch(d.birth_ok) AS BIGINT) AS birth_time, CAST(len(s.l) AS INTEGER) AS n_tokens,
               row_number() OVER (PARTITION BY d.split ORDER BY s.subject_id) - 1 AS rn
        FROM (
            SELECT subject_id, list({'id': CAST(id AS INTEGER), 't': CAST(epoch(t) AS BIGINT)} ORDER BY r, part, er, sub) AS l
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
                "SELECT subject_id, tokens, times, birth_time, n_tokens FROM seqs WHERE split = ? AND rn >= ? AND rn < ? ORDER BY subject_id",
                params=[split, offset, offset + subjects_per_shard],
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
