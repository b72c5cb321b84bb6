"""The reduce of the sharded prepare: small per-shard summaries -> the global decisions and outputs.

Every global decision of `prepare` is a sum, a min/max or an order statistic over subjects, and
subjects never straddle shards, so the reduce gets the single pass's answer exactly:

- kept codes: train subjects per code are counted per shard and summed (`reduce_codes`);
- value deciles: DuckDB's `quantile_cont` over the train values every shard spilled, a batch of
  codes at a time (the same multiset of values, so the same cut points, within a memory bound);
- the vocabulary: years, ages and train subjects per structural token, combined
  (`vocab_build.combine_inputs`);
- token files: output file n holds the subjects ranked n*S..(n+1)*S-1 in (split, subject_id) order,
  as in the single pass; each shard writes its part of every file and `gather_tokens` concatenates
  the parts and orders them by subject_id;
- counts for prepare.json: sums (`add`).
"""

from __future__ import annotations

from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import duckdb
import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

from cehrx.data.duck import literal
from cehrx.data.shard_writer import write_table
from cehrx.data.shards import SHARD_SCHEMA, SPLITS

VALUE_BYTES = 64  # DuckDB's memory per value held by quantile_cont (value, sort, state), with room


def add(a, b):
    """Nested dicts of counts summed key by key (a's keys first); other values: a's."""
    if isinstance(a, dict) and isinstance(b, dict):
        out = dict(a)
        for k, v in b.items():
            out[k] = add(out[k], v) if k in out else v
        return out
    if isinstance(a, (int, float)) and not isinstance(a, bool) and isinstance(b, (int, float)):
        return a + b
    return a


def add_all(parts: list):
    out = parts[0]
    for p in parts[1:]:
        out = add(out, p)
    return out


def files_sql(paths: list[Path]) -> str:
    return "[" + ", ".join(literal(str(p)) for p in paths) + "]"


def reduce_codes(con: duckdb.DuckDBPyConnection, counts: list[Path], min_subjects: int, out: Path) -> dict:
    """`out/kept_codes.parquet` (code, subjects; code order): the codes in >= min_subjects train subjects,
    summed over the shards' `code_counts` (code, n, subjects); returns the rare-code counts and what
    `prepare.refuse_no_codes` needs."""
    con.execute(f"""
        CREATE OR REPLACE TABLE code_counts AS
        SELECT code, CAST(sum(n) AS BIGINT) AS n, CAST(sum(subjects) AS BIGINT) AS subjects
        FROM read_parquet({files_sql(counts)}) GROUP BY code
    """)
    kept = f"subjects >= {int(min_subjects)} AND subjects > 0"  # as token_order.select_codes
    con.execute(
        f"CREATE OR REPLACE TABLE kept_codes AS SELECT code, subjects FROM code_counts WHERE {kept} ORDER BY code"
    )
    con.execute(f"COPY kept_codes TO {literal(str(out / 'kept_codes.parquet'))} (FORMAT parquet)")
    dropped, n_dropped, n_train, most, n_kept = con.execute(f"""
        SELECT coalesce(sum(n) FILTER (WHERE NOT ({kept})), 0), count(*) FILTER (WHERE NOT ({kept})),
               count(*) FILTER (WHERE subjects > 0), coalesce(max(subjects), 0), count(*) FILTER (WHERE {kept})
        FROM code_counts
    """).fetchall()[0]
    return {
        "rare_code_events_dropped": int(dropped),
        "rare_codes_dropped": int(n_dropped),
        "codes_in_train": int(n_train),
        "most_train_subjects": int(most),
        "kept": int(n_kept),
    }


def reduce_edges(
    con: duckdb.DuckDBPyConnection, values: list[Path], num_bins: int, min_values: int, budget: int, out: Path
) -> int:
    """`out/edges.parquet` (code, cuts, lo, hi): `token_order.learn_value_edges` over the shards' train values.

    The same `quantile_cont` over the same values per code, so the same cut points; codes are taken in
    batches of at most `budget / VALUE_BYTES` values, as a quantile holds all of its code's values in memory.
    """
    qs = ", ".join(repr(i / num_bins) for i in range(1, num_bins))
    src = f"read_parquet({files_sql(values)})"
    cap = max(1, budget // VALUE_BYTES)
    con.execute(f"""
        CREATE OR REPLACE TABLE value_batches AS
        SELECT code, (sum(n) OVER (ORDER BY code ROWS UNBOUNDED PRECEDING) - n) // {cap} AS batch FROM (
            SELECT code, count(*) AS n FROM {src} SEMI JOIN kept_codes USING (code) GROUP BY code
            HAVING count(*) >= {int(min_values)})
    """)
    con.execute("CREATE OR REPLACE TABLE edges (code VARCHAR, cuts DOUBLE[], lo DOUBLE, hi DOUBLE)")
    for (batch,) in con.execute("SELECT DISTINCT batch FROM value_batches ORDER BY batch").fetchall():
        con.execute(f"""
            INSERT INTO edges
            SELECT code, quantile_cont(value, [{qs}]), min(value), max(value)
            FROM {src} SEMI JOIN (SELECT code FROM value_batches WHERE batch = {int(batch)}) USING (code) GROUP BY code
        """)
    con.execute(f"COPY (SELECT * FROM edges ORDER BY code) TO {literal(str(out / 'edges.parquet'))} (FORMAT parquet)")
    return con.execute("SELECT count(*) FROM edges").fetchall()[0][0]


def file_firsts(subjects: list[Path], subjects_per_shard: int) -> dict[str, list[int]]:
    """Per split, the first subject_id of each output token file (subjects in subject_id order,
    `subjects_per_shard` per file; a split without subjects still has one, empty, file)."""
    table = pa.concat_tables([pq.read_table(p) for p in subjects]) if subjects else None
    out = {}
    for split in SPLITS:
        ids = np.zeros(0, np.int64)
        if table is not None and table.num_rows:
            ids = np.sort(table.filter(pc.equal(table.column("split"), split)).column("subject_id").to_numpy())
        out[split] = [int(x) for x in ids[::subjects_per_shard]] or [int(np.iinfo(np.int64).min)]
    return out


def gather_tokens(parts: list[Path], firsts: dict[str, list[int]], out: Path, threads: int) -> None:
    """`out/tokens/<split>/<n>.parquet`: the shards' parts of file n, in subject_id order (the single pass's files)."""
    jobs = []
    for split in SPLITS:
        (out / "tokens" / split).mkdir(parents=True, exist_ok=True)
        jobs += [(split, n) for n in range(len(firsts[split]))]

    def one(job: tuple[str, int]) -> None:
        split, n = job
        files = [p / split / f"{n}.parquet" for p in parts if (p / split / f"{n}.parquet").is_file()]
        table = pa.concat_tables([pq.read_table(f) for f in files]) if files else SHARD_SCHEMA.empty_table()
        table = table.take(pc.sort_indices(table, [("subject_id", "ascending")])).combine_chunks()
        write_table(table.cast(SHARD_SCHEMA), out / "tokens" / split / f"{n}.parquet")

    with ThreadPoolExecutor(max_workers=max(1, threads)) as pool:
        list(pool.map(one, jobs))


def gather_lengths(paths: list[Path]) -> np.ndarray:
    """Tokens per subject over all shards, in (split, subject_id) order (the single pass's order)."""
    if not paths:
        return np.zeros(0, np.int64)
    t = pa.concat_tables([pq.read_table(p) for p in paths])
    order = np.lexsort((t.column("subject_id").to_numpy(), t.column("split").to_numpy()))
    return t.column("n_tokens").to_numpy()[order].astype(np.int64)


def merge_tables(parts: list[dict], optional: tuple[str, ...]) -> dict:
    """The OMOP table listing of the whole source from the shards' (rows of sharded tables summed)."""
    first = parts[0]
    sharded = set(first.get("sharded", []))
    rows = {k: (sum(p["rows"][k] for p in parts) if k in sharded else v) for k, v in first["rows"].items()}
    return {
        "found": first["found"],
        "rows": rows,
        "missing_optional": first["missing_optional"],
        "empty": sorted(k for k, v in rows.items() if v == 0 and k in optional),
    }


def merge_splits(parts: list[dict]) -> dict:
    """`split_subjects` reports of disjoint subjects -> the whole's."""
    out = dict(parts[0])
    subjects = add_all([p["subjects"] for p in parts])
    out["subjects"] = dict(sorted(subjects.items()))
    out["hash_assigned"] = sum(p["hash_assigned"] for p in parts)
    return out


def merge_visits(parts: list[dict]) -> dict:
    out = add_all(parts)
    out["events_attached"] = dict(sorted(out["events_attached"].items()))
    return out
