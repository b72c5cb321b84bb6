"""Read a MEDS 0.4 dataset (data/**/*.parquet, metadata/codes.parquet, metadata/subject_splits.parquet).

Fills the same `events` and `code_meta` tables as the OMOP path, plus `source_splits` when
the dataset has its own splits. Visits are not known here: `visits.py` makes them from
configurable admission/discharge code patterns.
"""

from __future__ import annotations

from pathlib import Path

import duckdb
import pyarrow.parquet as pq
from meds import DataSchema

from cehrx.data.duck import literal
from cehrx.data.omop_to_meds import EVENTS_DDL
from cehrx.data.splits import load_split_file
from cehrx.errors import DataError


def data_files(root: Path) -> list[Path]:
    files = sorted((root / "data").rglob("*.parquet"))
    if not files:
        raise DataError(f"no MEDS data in {root}: expected {root / 'data'}/**/*.parquet")
    return files


def validate_schema(files: list[Path]) -> list[str]:
    """Check each shard against the MEDS DataSchema; return the extension columns seen."""
    required = {"subject_id", "time", "code"}
    extra: set[str] = set()
    for f in files:
        schema = pq.read_schema(f)
        missing = required - set(schema.names)
        if missing:
            raise DataError(f"{f} is not MEDS data: missing column(s) {', '.join(sorted(missing))}")
        try:  # castable types (float64 values, string text) are fine: align casts them on read
            DataSchema.align(schema.empty_table())
        except Exception as e:  # noqa: BLE001 - meds raises several exception types
            raise DataError(f"{f} does not match the MEDS data schema: {e}") from e
        extra |= set(schema.names) - required
    return sorted(extra)


def meds_to_events(con: duckdb.DuckDBPyConnection, path: str) -> dict:
    root = Path(path).expanduser()
    if not root.is_dir():
        raise DataError(f"MEDS path not found: {root} (expected a MEDS dataset folder with data/ and metadata/)")
    files = data_files(root)
    columns = validate_schema(files)
    glob = literal(str(root / "data" / "**" / "*.parquet"))
    numeric = "TRY_CAST(numeric_value AS DOUBLE)" if "numeric_value" in columns else "NULL"
    text = "CAST(text_value AS VARCHAR)" if "text_value" in columns else "NULL"
    unit = "CAST(unit AS VARCHAR)" if "unit" in columns else "NULL"
    con.execute(EVENTS_DDL)
    con.execute(f"""
        CREATE OR REPLACE TEMP TABLE meds_raw AS
        SELECT TRY_CAST(subject_id AS BIGINT) AS subject_id, TRY_CAST(time AS TIMESTAMP) AS time, CAST(code AS VARCHAR) AS code,
               {numeric} AS numeric_value, {text} AS text_value, {unit} AS unit
        FROM read_parquet({glob}, union_by_name = true)
    """)
    n_in, null_subject, null_code, nonfinite = con.execute("""
        SELECT count(*), count(*) FILTER (WHERE subject_id IS NULL), count(*) FILTER (WHERE code IS NULL OR code = ''),
               count(*) FILTER (WHERE numeric_value IS NOT NULL AND NOT isfinite(numeric_value))
        FROM meds_raw
    """).fetchall()[0]
    con.execute("""
        INSERT INTO events (subject_id, time, code, numeric_value, text_value, unit)
        SELECT subject_id, time, code, CASE WHEN isfinite(numeric_value) THEN numeric_value END, text_value, unit
        FROM meds_raw WHERE subject_id IS NOT NULL AND code IS NOT NULL AND code <> ''
    """)
    con.execute("DROP TABLE meds_raw")
    _codes(con, root)
    has_splits = _splits(con, root)
    stats: dict = {"rows_in": {"meds": n_in}, "dropped": {}, "repaired": {}, "files": len(files), "source_splits": has_splits}
    dropped = {k: v for k, v in {"null_subject_id": null_subject, "null_code": null_code}.items() if v}
    if dropped:
        stats["dropped"]["meds"] = dropped
    if nonfinite:
        stats["repaired"]["meds"] = {"non_finite_value (value set to null)": nonfinite}
    return stats


def _codes(con: duckdb.DuckDBPyConnection, root: Path) -> None:
    codes = root / "metadata" / "codes.parquet"
    desc = "SELECT NULL::VARCHAR AS code, NULL::VARCHAR AS description WHERE false"
    if codes.is_file():
        names = pq.read_schema(codes).names
        if "code" in names and "description" in names:
            desc = f"SELECT CAST(code AS VARCHAR) AS code, CAST(description AS VARCHAR) AS description FROM read_parquet({literal(str(codes))})"
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
