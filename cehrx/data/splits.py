"""Subject splits: the dataset's own MEDS splits when present, else a deterministic hash split."""

from __future__ import annotations

import duckdb

from cehrx.data.duck import literal
from cehrx.errors import DataError

ALIASES = {"train": "train", "tuning": "tuning", "val": "tuning", "valid": "tuning", "validation": "tuning",
           "held_out": "held_out", "test": "held_out", "heldout": "held_out"}


def hash_split_sql(subject: str, fractions: dict[str, float], salt: str) -> str:
    """SQL assigning a split from md5(salt/subject_id): stable across runs, machines and DuckDB versions."""
    total = sum(fractions.values())
    if total <= 0 or any(v < 0 for v in fractions.values()):
        raise DataError(f"split fractions must be >= 0 and sum to > 0, got {dict(fractions)}")
    bucket = f"(md5_number({literal(salt + '/')} || CAST({subject} AS VARCHAR)) % 1000000)::DOUBLE / 1000000"
    cases, acc = [], 0.0
    for name in ("train", "tuning"):
        acc += fractions.get(name, 0.0) / total
        cases.append(f"WHEN {bucket} < {acc!r} THEN '{name}'")
    return f"(CASE {' '.join(cases)} ELSE 'held_out' END)"


def assign_splits(con: duckdb.DuckDBPyConnection, fractions: dict[str, float], salt: str, use_source: bool) -> dict:
    """Create `subject_split(subject_id, split)` for every subject in `events`."""
    hashed = hash_split_sql("s.subject_id", fractions, salt)
    if use_source:
        cases = " ".join(f"WHEN lower(ss.split) = {literal(k)} THEN {literal(v)}" for k, v in ALIASES.items())
        source = f"CASE {cases} END"
        con.execute(f"""
            CREATE OR REPLACE TABLE subject_split AS
            SELECT s.subject_id, coalesce({source}, {hashed}) AS split, ({source}) IS NULL AS hashed
            FROM (SELECT DISTINCT subject_id FROM events) s LEFT JOIN source_splits ss USING (subject_id)
            ORDER BY s.subject_id
        """)
    else:
        con.execute(f"""
            CREATE OR REPLACE TABLE subject_split AS
            SELECT s.subject_id, {hashed} AS split, true AS hashed
            FROM (SELECT DISTINCT subject_id FROM events) s ORDER BY s.subject_id
        """)
    rows = con.execute("SELECT split, count(*), count(*) FILTER (WHERE hashed) FROM subject_split GROUP BY 1 ORDER BY 1").fetchall()
    return {"subjects": {r[0]: r[1] for r in rows}, "hash_assigned": sum(r[2] for r in rows),
            "method": "source" if use_source else "hash"}
