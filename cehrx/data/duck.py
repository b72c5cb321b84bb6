"""DuckDB connections configured for out-of-core work within a memory budget."""

from __future__ import annotations

from pathlib import Path

import duckdb


def connect(memory_limit: str | None = "3GB", threads: int | None = None, temp_dir: str | Path | None = None) -> duckdb.DuckDBPyConnection:
    """An in-memory DuckDB that spills to `temp_dir` instead of exceeding `memory_limit`.

    Insertion order is preserved so that ordered queries write byte-identical outputs.
    """
    con = duckdb.connect(":memory:")
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
