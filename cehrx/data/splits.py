"""Subject splits: a user's splits file, else the dataset's own MEDS splits, else a deterministic hash split."""

from __future__ import annotations

from pathlib import Path

import duckdb

from cehrx.data.duck import literal, reading
from cehrx.errors import DataError, one_line

ALIASES = {
    "train": "train",
    "tuning": "tuning",
    "val": "tuning",
    "valid": "tuning",
    "validation": "tuning",
    "held_out": "held_out",
    "test": "held_out",
    "heldout": "held_out",
}


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


def load_split_file(con: duckdb.DuckDBPyConnection, path: str | Path, strict: bool = False) -> None:
    """Read a MEDS `subject_splits` file (parquet or csv: subject_id, split) into `source_splits`.

    `strict` (a file the user named) refuses split names other than ALIASES and a subject listed
    under two splits, naming the file and the value: silently hash-assigning a typo'd split would put
    patients meant for evaluation into pretraining.
    """
    f = Path(path)
    if not f.is_file():
        raise DataError(f"splits file not found: {f}")
    reader = "read_csv" if f.suffix.lower() in (".csv", ".gz") else "read_parquet"
    try:
        names = [r[0] for r in con.execute(f"DESCRIBE SELECT * FROM {reader}({literal(str(f))})").fetchall()]
    except duckdb.Error as e:
        raise DataError(f"cannot read splits file {f}: {one_line(e)}") from e
    if not {"subject_id", "split"} <= set(names):
        raise DataError(f"{f} must have columns subject_id and split (has {', '.join(names)})")
    with reading(f"splits file {f}"):
        con.execute(f"""
            CREATE OR REPLACE TABLE source_splits_raw AS
            SELECT TRY_CAST(subject_id AS BIGINT) AS subject_id, subject_id AS raw_id, CAST(split AS VARCHAR) AS split
            FROM {reader}({literal(str(f))})
        """)
    if strict:
        _check_split_file(con, f)
    con.execute("""
        CREATE OR REPLACE TABLE source_splits AS
        SELECT subject_id, any_value(split) AS split FROM source_splits_raw GROUP BY 1;
        DROP TABLE source_splits_raw
    """)


def _check_split_file(con: duckdb.DuckDBPyConnection, f: Path) -> None:
    known = ", ".join(literal(k) for k in ALIASES)
    bad = con.execute(f"""
        SELECT 'subject_id ' || CAST(raw_id AS VARCHAR) || ' is not an integer' FROM source_splits_raw WHERE subject_id IS NULL
        UNION ALL SELECT 'split ' || coalesce('''' || split || '''', 'NULL') || ' is not one of {", ".join(dict.fromkeys(ALIASES.values()))} (or an alias)'
        FROM source_splits_raw WHERE split IS NULL OR lower(split) NOT IN ({known})
        UNION ALL SELECT 'subject_id ' || CAST(subject_id AS VARCHAR) || ' is listed under several splits'
        FROM source_splits_raw GROUP BY subject_id HAVING count(DISTINCT lower(split)) > 1
        LIMIT 1
    """).fetchall()
    if bad:
        raise DataError(f"splits file {f}: {bad[0][0]}")


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
    rows = con.execute(
        "SELECT split, count(*), count(*) FILTER (WHERE hashed) FROM subject_split GROUP BY 1 ORDER BY 1"
    ).fetchall()
    return {
        "subjects": {r[0]: r[1] for r in rows},
        "hash_assigned": sum(r[2] for r in rows),
        "method": "source" if use_source else "hash",
    }
