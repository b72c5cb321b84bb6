"""DuckDB connections configured for out-of-core work within a memory budget."""

from __future__ import annotations

from contextlib import contextmanager
from pathlib import Path
from typing import Iterator

import duckdb

from cehrx.errors import DataError, one_line

# SQL: added to a day's midnight, the last second of that day (23:59:59). Date-only events sit there
# (`omop_mapping.event_time`) and so do the ends of day visits (`visits.attach_events`): a prediction
# time inside a day sees neither.
END_OF_DAY = "INTERVAL '23 hours 59 minutes 59 seconds'"


def connect(
    memory_limit: str | None = "3GB",
    threads: int | None = None,
    temp_dir: str | Path | None = None,
    database: str | Path | None = None,
) -> duckdb.DuckDBPyConnection:
    """An in-memory DuckDB (or the file `database`, which a later job of a shard reopens) that spills to
    `temp_dir` instead of exceeding `memory_limit`.

    Insertion order is preserved so that ordered queries write byte-identical outputs.
    """
    con = duckdb.connect(str(database) if database is not None else ":memory:")
    if memory_limit:
        con.execute(f"SET memory_limit = '{memory_limit}'")
    if threads:
        con.execute(f"SET threads = {int(threads)}")
    if temp_dir is not None:
        Path(temp_dir).mkdir(parents=True, exist_ok=True)
        con.execute(f"SET temp_directory = '{Path(temp_dir).as_posix()}'")
    con.execute("SET preserve_insertion_order = true")
    con.execute("SET TimeZone = 'UTC'")
    return con


def quote(name: str) -> str:
    """Quote an SQL identifier.

    >>> quote('PERSON_ID'), quote('we"ird')
    ('"PERSON_ID"', '"we""ird"')
    """
    return '"' + name.replace('"', '""') + '"'


def literal(value: str) -> str:
    """Quote an SQL string literal.

    >>> literal("O'Brien")
    "'O''Brien'"
    """
    return "'" + str(value).replace("'", "''") + "'"


def given(expr: str, src_type: str | None = None) -> str:
    """SQL: the source holds a value here (not NULL, not blank text), whether it parses or not.

    Tells a missing value from an unparsable one, so each is counted under its own reason. Only
    text (or an unknown type) can be blank; a typed column just needs to be non-NULL.

    >>> print(given('"x"'))
    ("x" IS NOT NULL AND trim(CAST("x" AS VARCHAR)) <> '')
    >>> print(given('"x"', 'DATE'))
    ("x" IS NOT NULL)
    """
    if src_type is not None and src_type.upper() != "VARCHAR":
        return f"({expr} IS NOT NULL)"
    return f"({expr} IS NOT NULL AND trim(CAST({expr} AS VARCHAR)) <> '')"


def as_timestamp(expr: str, src_type: str | None) -> str:
    """SQL: a source column of DuckDB type `src_type` as a UTC TIMESTAMP, NULL when it does not parse.

    Text is parsed as TIMESTAMPTZ, so a UTC offset or zone name (`2020-01-01T10:00:00+02:00`) moves
    it to UTC (the connection's zone) as it does a TIMESTAMPTZ column; a plain cast to TIMESTAMP
    would drop the offset. Text without one is read as UTC. Types that hold no time (numbers) give NULL.
    """
    if (src_type or "").upper() == "VARCHAR":
        return f"TRY_CAST(TRY_CAST({expr} AS TIMESTAMPTZ) AS TIMESTAMP)"
    return f"TRY_CAST({expr} AS TIMESTAMP)"


@contextmanager
def reading(what: str) -> Iterator[None]:
    """Turn DuckDB's errors about the input itself into a one-line DataError naming `what`.

    A CSV is parsed lazily, column by column, so a non-UTF-8 byte or a broken row in a column that
    is read only later fails there and not when the file is opened.
    """
    try:
        yield
    except (duckdb.InvalidInputException, duckdb.ConversionException) as e:
        raise DataError(f"cannot read {what}: {one_line(e)}") from e


def tag_reasons(
    con: duckdb.DuckDBPyConnection,
    name: str,
    select: str,
    reasons: tuple[tuple[str, str], ...],
    dedupe: tuple[str, str, str] | tuple[str, str, str, str] | None = None,
) -> None:
    """Create the temp table `name` from `select` plus `drop_reason`: the first of `reasons`
    (name, SQL condition on the row) that holds, NULL for a row that is kept.

    One reason per row, checked in order, so that rows in = rows kept + rows dropped by reason and
    every drop is counted under its true cause. `dedupe` = (reason, key, order[, within]): of the rows no
    reason dropped, those sharing a non-null `key` (and the same `within` columns) after the first in
    `order` are dropped as `reason`.
    """
    case = "CASE " + " ".join(f"WHEN {cond} THEN {literal(r)}" for r, cond in reasons) + " END"
    sql = f"SELECT *, {case} AS drop_reason FROM ({select})"
    if dedupe:
        reason, key, order = dedupe[:3]
        within = f"{dedupe[3]}, " if len(dedupe) > 3 else ""
        sql = (
            f"SELECT * REPLACE (CASE WHEN drop_reason IS NULL AND {key} IS NOT NULL AND row_number() OVER "
            f"(PARTITION BY drop_reason IS NULL, {within}{key} ORDER BY {order}) > 1 THEN {literal(reason)} ELSE drop_reason END "
            f"AS drop_reason) FROM ({sql})"
        )
    con.execute(f"CREATE OR REPLACE TEMP TABLE {quote(name)} AS {sql}")


def count_reasons(con: duckdb.DuckDBPyConnection, name: str) -> dict[str, int]:
    """Rows of a `tag_reasons` table dropped, by reason (only the reasons that occur)."""
    rows = con.execute(
        f"SELECT drop_reason, count(*) FROM {quote(name)} WHERE drop_reason IS NOT NULL GROUP BY 1 ORDER BY 1"
    ).fetchall()
    return {r: int(n) for r, n in rows}
