"""Read a MEDS 0.4 dataset (data/**/*.parquet, metadata/codes.parquet, metadata/subject_splits.parquet).

Fills the same `events` and `code_meta` tables as the OMOP path, plus `source_splits` when
the dataset has its own splits. Visits are not known here: `visits.py` makes them from
configurable admission/discharge code patterns.
"""

from __future__ import annotations

from pathlib import Path

import duckdb
import pyarrow as pa
import pyarrow.parquet as pq
from meds import DataSchema

from cehrx.data.duck import as_timestamp, count_reasons, given, literal, reading, tag_reasons
from cehrx.data.omop_to_meds import EVENTS_DDL
from cehrx.data.sharding import Shard
from cehrx.data.splits import load_split_file
from cehrx.errors import DataError, one_line

# Why a MEDS row is dropped, in the order checked (duck.tag_reasons): rows in = kept + dropped by reason.
ROW_REASONS = (
    ("null_subject_id", "NOT sid_given"),
    ("unparsable_subject_id", "subject_id IS NULL"),
    ("null_code", "code IS NULL OR code = ''"),
    ("unparsable_time", "time IS NULL AND time_given"),
)


def data_files(root: Path) -> list[Path]:
    files = sorted((root / "data").rglob("*.parquet"))
    if not files:
        raise DataError(f"no MEDS data in {root}: expected {root / 'data'}/**/*.parquet")
    return files


def parquet_schema(f: Path) -> pa.Schema:
    """A parquet file's schema, or a one-line DataError naming the file (truncated, not parquet)."""
    try:
        return pq.read_schema(f)
    except (pa.ArrowException, OSError) as e:
        raise DataError(f"cannot read {f}: {one_line(e)}") from e


def validate_schema(files: list[Path]) -> list[str]:
    """Check each shard against the MEDS DataSchema; return the extension columns seen."""
    required = {"subject_id", "time", "code"}
    extra: set[str] = set()
    for f in files:
        schema = parquet_schema(f)
        missing = required - set(schema.names)
        if missing:
            raise DataError(
                f"{f} is not MEDS data: missing column(s) {', '.join(sorted(missing))} (it has: {', '.join(schema.names)})"
            )
        try:  # castable types (float64 values, string text) are fine: align casts them on read
            DataSchema.align(schema.empty_table())
        except Exception as e:  # noqa: BLE001 - meds raises several exception types
            raise DataError(f"{f} does not match the MEDS data schema: {one_line(e)}") from e
        extra |= set(schema.names) - required
    return sorted(extra)


def meds_to_events(con: duckdb.DuckDBPyConnection, path: str, shard: Shard | None = None) -> dict:
    """Fill `events` and `code_meta` (and `source_splits`); return rows in, kept, dropped and repaired by reason.

    Values are parsed, not trusted: a time is read as UTC (`duck.as_timestamp`, offsets honoured),
    and a time or value that does not parse is counted under its own reason rather than read as a
    static event or a missing value. With a `shard`, only that shard's rows are read.
    """
    root = Path(path).expanduser()
    if not root.is_dir():
        raise DataError(f"MEDS path not found: {root} (expected a MEDS dataset folder with data/ and metadata/)")
    files = data_files(root)
    validate_schema(files)
    source = f"read_parquet({literal(str(root / 'data' / '**' / '*.parquet'))}, union_by_name = true)"
    if shard is not None:
        source = f"(SELECT * FROM {source} WHERE {shard.where('subject_id')})"
    with reading(f"MEDS data {root / 'data'}"):
        n_in, kept, nonfinite, unparsable = _load_rows(con, source)
    dropped = count_reasons(con, "meds_raw")
    con.execute("DROP TABLE meds_raw")
    _codes(con, root)
    has_splits = _splits(con, root)
    stats: dict = {
        "rows_in": {"meds": n_in},
        "kept": {"meds": kept},
        "dropped": {},
        "repaired": {},
        "files": len(files),
        "source_splits": has_splits,
    }
    if dropped:
        stats["dropped"]["meds"] = dropped
    repaired = {"non_finite_value (value set to null)": nonfinite, "unparsable_value (value set to null)": unparsable}
    if any(repaired.values()):
        stats["repaired"]["meds"] = {k: v for k, v in repaired.items() if v}
    return stats


def _load_rows(con: duckdb.DuckDBPyConnection, source: str) -> tuple[int, int, int, int]:
    """`meds_raw` (every row, parsed, with its drop reason) and the kept rows into `events`.

    Returns rows in, rows kept, and the kept rows whose value was non-finite or did not parse (set to null)."""
    types = {r[0]: r[1] for r in con.execute(f"DESCRIBE SELECT * FROM {source}").fetchall()}
    con.execute(EVENTS_DDL)
    numeric = "TRY_CAST(numeric_value AS DOUBLE)" if "numeric_value" in types else "NULL::DOUBLE"
    tag_reasons(
        con,
        "meds_raw",
        f"""
        SELECT TRY_CAST(subject_id AS BIGINT) AS subject_id, {given("subject_id", types["subject_id"])} AS sid_given,
               {as_timestamp("time", types["time"])} AS time, {given("time", types["time"])} AS time_given, CAST(code AS VARCHAR) AS code,
               {numeric} AS numeric_value, {given("numeric_value", types["numeric_value"]) if "numeric_value" in types else "false"} AS value_given,
               {"CAST(text_value AS VARCHAR)" if "text_value" in types else "NULL"} AS text_value,
               {"CAST(unit AS VARCHAR)" if "unit" in types else "NULL"} AS unit
        FROM {source}
    """,
        ROW_REASONS,
    )
    n_in, nonfinite, unparsable = con.execute("""
        SELECT count(*), count(*) FILTER (WHERE drop_reason IS NULL AND NOT isfinite(numeric_value)),
               count(*) FILTER (WHERE drop_reason IS NULL AND numeric_value IS NULL AND value_given)
        FROM meds_raw
    """).fetchall()[0]
    kept = con.execute("""
        INSERT INTO events (subject_id, time, code, numeric_value, text_value, unit)
        SELECT subject_id, time, code, CASE WHEN isfinite(numeric_value) THEN numeric_value END, text_value, unit
        FROM meds_raw WHERE drop_reason IS NULL
    """).fetchall()[0][0]
    return n_in, kept, nonfinite, unparsable


def _codes(con: duckdb.DuckDBPyConnection, root: Path) -> None:
    codes = root / "metadata" / "codes.parquet"
    desc = "SELECT NULL::VARCHAR AS code, NULL::VARCHAR AS description WHERE false"
    if codes.is_file():
        names = parquet_schema(codes).names
        if "code" in names and "description" in names:
            desc = f"SELECT CAST(code AS VARCHAR) AS code, CAST(description AS VARCHAR) AS description FROM read_parquet({literal(str(codes))})"
    with reading(str(codes)):
        con.execute(f"""
            CREATE OR REPLACE TABLE code_meta AS
            WITH d AS ({desc}), d1 AS (SELECT code, any_value(description) AS description FROM d GROUP BY code)
            SELECT e.code, d1.description, NULL::BIGINT AS omop_concept_id, NULL::VARCHAR AS omop_domain
            FROM (SELECT DISTINCT code FROM events) e LEFT JOIN d1 USING (code) ORDER BY e.code
        """)


def _splits(con: duckdb.DuckDBPyConnection, root: Path) -> bool:
    f = root / "metadata" / "subject_splits.parquet"
    if f.is_file():
        load_split_file(con, f)
    return f.is_file()
