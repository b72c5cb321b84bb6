"""OMOP CDM -> MEDS events, in DuckDB SQL, following the conventions of DESIGN §3.

Builds two tables on the connection:
- `events` (EVENTS_DDL): one row per MEDS event plus the extension columns `src_table`,
  `visit_id`, `visit_end`, `unit`, `omop_concept_id`;
- `code_meta`: code, description, omop_concept_id, omop_domain.

What maps to what (tables, columns, drop reasons, times, concepts) is `omop_mapping.py`; this
module runs it, table by table. Every row that is dropped or repaired is counted by table and
reason; the counts go to prepare.json. A row is dropped for the first reason that holds
(`omop_mapping.REF_REASONS`, ...), so per table the rows in = rows kept + rows dropped by reason.
A table that lacks a column the mapping needs (`omop_mapping.REQUIRED`, `EventTable.required`)
is an error naming the file, table and column. Nothing here loops over rows in Python.
"""

from __future__ import annotations

import logging

import duckdb

from cehrx.data.duck import as_timestamp, count_reasons, quote, reading, tag_reasons
from cehrx.data.omop_mapping import (
    CONCEPT_REASONS,
    EVENT_TABLES,
    PERSON_ID_REASONS,
    REF_REASONS,
    REQUIRED,
    EventTable,
    build_concepts,
    code_sql,
    event_time,
    present,
    time_reasons,
)
from cehrx.data.omop_tables import OmopTables

log = logging.getLogger(__name__)

EVENTS_DDL = """
CREATE OR REPLACE TABLE events (
    subject_id BIGINT, time TIMESTAMP, code VARCHAR, numeric_value DOUBLE, text_value VARCHAR,
    src_table VARCHAR, visit_id BIGINT, visit_end TIMESTAMP, unit VARCHAR, omop_concept_id BIGINT
)"""


def omop_to_events(con: duckdb.DuckDBPyConnection, tables: OmopTables, current_year: int) -> dict:
    """Fill `events` and `code_meta`; return counts in, kept, and dropped/repaired by table and reason.

    `subjects` is the number of persons kept (some may have no event at all). An empty optional
    table is skipped, whatever its columns.
    """
    _require(tables)
    build_concepts(con, tables)
    con.execute(EVENTS_DDL)
    stats: dict = {"rows_in": {}, "kept": {}, "dropped": {}, "repaired": {}}
    with reading(tables.where("person")):
        _persons(con, tables, current_year, stats)
    steps = [("visit_occurrence", lambda: _visits(con, tables, stats))]
    steps += [(spec.name, lambda spec=spec: _clinical(con, tables, spec, stats)) for spec in EVENT_TABLES]
    steps += [("death", lambda: _death(con, tables, stats))]
    for name, step in steps:
        if tables.has(name):
            stats["rows_in"][name] = tables.rows[name]
            stats["kept"][name] = 0
            if tables.has_rows(name):
                with reading(tables.where(name)):
                    step()
    stats["subjects"] = stats["kept"]["person"]
    # min(), not any_value(): a code with several concept ids gets the same values whatever the row order,
    # and the sharded prepare merges the shards' code_meta with min() too (`prepare_jobs`), so both agree
    con.execute("""
        CREATE OR REPLACE TABLE code_meta AS
        SELECT e.code, min(c.description) AS description, min(e.omop_concept_id) AS omop_concept_id,
               min(c.domain) AS omop_domain
        FROM events e LEFT JOIN concepts c ON c.concept_id = e.omop_concept_id
        GROUP BY e.code ORDER BY e.code
    """)
    return stats


def _require(tables: OmopTables) -> None:
    """Every table that will be read has the columns its mapping needs (empty optional tables are not read)."""
    needs = {**REQUIRED, **{spec.name: spec.required() for spec in EVENT_TABLES}}
    for name, columns in needs.items():
        if name == "person" or tables.has_rows(name):
            tables.require(name, *columns)


def _count(stats: dict, key: str, table: str, counts: dict[str, int]) -> None:
    nonzero = {k: int(v) for k, v in counts.items() if v}
    if nonzero:
        stats[key].setdefault(table, {}).update(nonzero)


def _tally(con: duckdb.DuckDBPyConnection, stats: dict, table: str, raw: str, kept: int) -> None:
    """Record a table's rows in (counted when it was opened), kept, and dropped by reason."""
    stats["kept"][table] = int(kept)
    _count(stats, "dropped", table, count_reasons(con, raw))


def _inserted(con: duckdb.DuckDBPyConnection, sql: str) -> int:
    """Run an INSERT and return how many rows it wrote."""
    return int(con.execute(sql).fetchall()[0][0])


def _persons(con: duckdb.DuckDBPyConnection, t: OmopTables, current_year: int, stats: dict) -> None:
    """`person_clean`: one row per valid person id; the birth, gender, race and ethnicity events.

    A birth comes from birth_datetime, else year/month/day of birth (an impossible date is no date);
    a person without a usable birth, or born after `current_year`, is kept with age unknown.
    """
    col = lambda n: t.col("person", n)  # noqa: E731
    has = lambda *n: present(t, "person", *n)  # noqa: E731
    bdt = t.first("person", "birth_datetime")
    birth_dt = as_timestamp(quote(bdt), t.col_type("person", bdt)) if bdt else "NULL::TIMESTAMP"
    concepts = ("gender_concept_id", "race_concept_id", "ethnicity_concept_id")
    bad_concept = " OR ".join(f"({has(c)} AND TRY_CAST({col(c)} AS BIGINT) IS NULL)" for c in concepts)
    ymd = "TRY_CAST(format('{:04d}-{:02d}-{:02d}', y, coalesce(m, 1), coalesce(d, 1)) AS DATE)"
    tag_reasons(
        con,
        "person_raw",
        f"""
        SELECT *, coalesce(birth_dt, CASE WHEN y BETWEEN 1 AND 9999 THEN CAST({ymd} AS TIMESTAMP) END) AS birth0 FROM (
            SELECT TRY_CAST({col("person_id")} AS BIGINT) AS person_id, {has("person_id")} AS pid_given,
                   {birth_dt} AS birth_dt, TRY_CAST({col("year_of_birth")} AS BIGINT) AS y,
                   TRY_CAST({col("month_of_birth")} AS BIGINT) AS m, TRY_CAST({col("day_of_birth")} AS BIGINT) AS d,
                   TRY_CAST({col(concepts[0])} AS BIGINT) AS gender, TRY_CAST({col(concepts[1])} AS BIGINT) AS race,
                   TRY_CAST({col(concepts[2])} AS BIGINT) AS ethnicity, {has("birth_datetime", "year_of_birth")} AS birth_given,
                   ({bad_concept}) AS bad_concept
            FROM omop_person)
    """,
        PERSON_ID_REASONS,
        dedupe=(  # the last keys break every tie left: the kept row does not depend on the row order
            "duplicate_person_id",
            "person_id",
            "birth0 NULLS LAST, gender, race, ethnicity, bad_concept, birth_given DESC, birth_dt, y, m, d",
        ),
    )
    con.execute(f"""
        CREATE OR REPLACE TEMP TABLE person_clean AS
        SELECT person_id, gender, race, ethnicity, birth0, CASE WHEN year(birth0) > {current_year} THEN NULL ELSE birth0 END AS birth,
               birth_given, bad_concept
        FROM person_raw WHERE drop_reason IS NULL
    """)
    kept, no_birth, bad_birth, future, bad_concept = con.execute("""
        SELECT count(*), count(*) FILTER (WHERE NOT birth_given), count(*) FILTER (WHERE birth_given AND birth0 IS NULL),
               count(*) FILTER (WHERE birth0 IS NOT NULL AND birth IS NULL), count(*) FILTER (WHERE bad_concept)
        FROM person_clean
    """).fetchall()[0]
    stats["rows_in"]["person"] = t.rows["person"]
    _tally(con, stats, "person", "person_raw", kept)
    _count(
        stats,
        "repaired",
        "person",
        {
            "no_birth_date (kept, age unknown)": no_birth,
            "unparsable_birth_date (kept, age unknown)": bad_birth,
            "birth_year_in_future (kept, age unknown)": future,
            "unparsable_gender_race_or_ethnicity (kept as unknown)": bad_concept,
        },
    )
    con.execute("DROP TABLE person_raw")
    _person_events(con)


def _person_events(con: duckdb.DuckDBPyConnection) -> None:
    """MEDS_BIRTH and the gender, race and ethnicity codes of every kept person, at birth."""
    con.execute("""
        INSERT INTO events (subject_id, time, code, src_table)
        SELECT person_id, birth, 'MEDS_BIRTH', 'person' FROM person_clean WHERE birth IS NOT NULL
    """)
    for column, fallback in (("gender", "Gender"), ("race", "Race"), ("ethnicity", "Ethnicity")):
        con.execute(f"""
            INSERT INTO events (subject_id, time, code, src_table, omop_concept_id)
            SELECT p.person_id, p.birth, coalesce(c.code, '{fallback}/' || CAST(p.{column} AS VARCHAR)), 'person', p.{column}
            FROM person_clean p LEFT JOIN concepts c ON c.concept_id = p.{column}
            WHERE p.{column} IS NOT NULL AND p.{column} <> 0
        """)


def _visits(con: duckdb.DuckDBPyConnection, t: OmopTables, stats: dict) -> None:
    """A visit event per valid visit_occurrence row (with its end and id), then its discharge event.

    An end before the start, or one that does not parse, becomes the start; an id that does not
    parse leaves the visit without one (its events are re-attached by date); all three are counted."""
    v = "visit_occurrence"
    _tag_visits(con, t)
    con.execute("""
        CREATE OR REPLACE TEMP TABLE visit_ok AS
        SELECT person_id, visit_id, concept_id, t AS start_t, greatest(coalesce(end_t, t), t) AS end_t, discharge_id,
               end_t < t AS end_before, end_t IS NULL AND end_given AS bad_end, visit_id IS NULL AND visit_given AS bad_id
        FROM visit_raw WHERE drop_reason IS NULL
    """)
    kept = _inserted(
        con,
        f"""
        INSERT INTO events (subject_id, time, code, src_table, visit_id, visit_end, omop_concept_id)
        SELECT v.person_id, v.start_t, {code_sql("v.concept_id")}, 'visit_occurrence', v.visit_id, v.end_t, v.concept_id
        FROM visit_ok v LEFT JOIN concepts c ON c.concept_id = v.concept_id
    """,
    )
    _tally(con, stats, v, "visit_raw", kept)
    repairs = con.execute(
        "SELECT count(*) FILTER (WHERE end_before), count(*) FILTER (WHERE bad_end), count(*) FILTER (WHERE bad_id) FROM visit_ok"
    ).fetchall()[0]
    _count(stats, "repaired", v, dict(zip(VISIT_REPAIRS, repairs)))
    con.execute(f"""
        INSERT INTO events (subject_id, time, code, src_table, visit_id, omop_concept_id)
        SELECT v.person_id, v.end_t, {code_sql("v.discharge_id")}, 'visit_discharge', v.visit_id, v.discharge_id
        FROM visit_ok v LEFT JOIN concepts c ON c.concept_id = v.discharge_id
        WHERE coalesce(v.discharge_id, 0) <> 0
    """)
    con.execute("DROP TABLE visit_raw")


VISIT_REPAIRS = (
    "end_before_start (end set to start)",
    "unparsable_end_date (end set to start)",
    "unparsable_visit_id (kept without id)",
)


def _tag_visits(con: duckdb.DuckDBPyConnection, t: OmopTables) -> None:
    """`visit_raw`: every visit_occurrence row parsed, with its drop reason; one row per (person, visit id)."""
    v = "visit_occurrence"
    col = lambda *n: t.col(v, *n)  # noqa: E731
    has = lambda *n: present(t, v, *n)  # noqa: E731
    start = event_time(t, v, ("visit_start_datetime",), ("visit_start_date",))
    end = event_time(t, v, ("visit_end_datetime",), ("visit_end_date",))
    tag_reasons(
        con,
        "visit_raw",
        f"""
        SELECT TRY_CAST({col("person_id")} AS BIGINT) AS person_id, {has("person_id")} AS pid_given,
               TRY_CAST({col("visit_occurrence_id")} AS BIGINT) AS visit_id, {has("visit_occurrence_id")} AS visit_given,
               TRY_CAST({col("visit_concept_id")} AS BIGINT) AS concept_id, {has("visit_concept_id")} AS concept_given,
               {start} AS t, {has("visit_start_datetime", "visit_start_date")} AS t_given,
               {end} AS end_t, {has("visit_end_datetime", "visit_end_date")} AS end_given,
               TRY_CAST({col("discharged_to_concept_id", "discharge_to_concept_id")} AS BIGINT) AS discharge_id
        FROM omop_{v}
    """,
        REF_REASONS + time_reasons("start_date") + CONCEPT_REASONS,
        # per person: events find their visit by (person, id), and a subject's shard must decide alone
        dedupe=("duplicate_visit_id", "visit_id", "t, end_t, concept_id, discharge_id", "person_id"),
    )


def _clinical(con: duckdb.DuckDBPyConnection, t: OmopTables, spec: EventTable, stats: dict) -> None:
    name = spec.name
    col = lambda *n: t.col(name, *n)  # noqa: E731
    has = lambda *n: present(t, name, *n)  # noqa: E731
    num_raw = col(spec.numeric) if spec.numeric else "NULL"
    value_concept = col(spec.value_concept) if spec.value_concept else "NULL"
    tag_reasons(
        con,
        "clin_raw",
        f"""
        SELECT TRY_CAST({col("person_id")} AS BIGINT) AS person_id, {has("person_id")} AS pid_given,
               {event_time(t, name, spec.start_datetime, spec.start_date)} AS t,
               {has(*spec.start_datetime, *spec.start_date)} AS t_given,
               TRY_CAST({col(spec.concept)} AS BIGINT) AS concept_id, {has(spec.concept)} AS concept_given,
               TRY_CAST({col("visit_occurrence_id")} AS BIGINT) AS visit_id, {has("visit_occurrence_id")} AS visit_given,
               CAST({num_raw} AS VARCHAR) AS num_raw, TRY_CAST({num_raw} AS DOUBLE) AS num,
               TRY_CAST({value_concept} AS BIGINT) AS value_concept,
               CAST({col(*spec.text) if spec.text else "NULL"} AS VARCHAR) AS text_raw,
               CAST({col(*spec.unit) if spec.unit else "NULL"} AS VARCHAR) AS unit
        FROM omop_{name}
    """,
        REF_REASONS + time_reasons() + CONCEPT_REASONS,
    )
    bad_num, dangling, bad_visit = con.execute("""
        SELECT count(*) FILTER (WHERE r.num_raw IS NOT NULL AND trim(r.num_raw) <> '' AND (r.num IS NULL OR NOT isfinite(r.num))),
               count(*) FILTER (WHERE coalesce(r.visit_id, 0) <> 0 AND NOT EXISTS (SELECT 1 FROM events e WHERE e.src_table = 'visit_occurrence' AND e.visit_id = r.visit_id AND e.subject_id = r.person_id)),
               count(*) FILTER (WHERE r.visit_id IS NULL AND r.visit_given)
        FROM clin_raw r WHERE r.drop_reason IS NULL
    """).fetchall()[0]
    kept = _inserted(
        con,
        f"""
        INSERT INTO events (subject_id, time, code, numeric_value, text_value, src_table, visit_id, unit, omop_concept_id)
        SELECT r.person_id, r.t, {code_sql("r.concept_id")},
               CASE WHEN isfinite(r.num) THEN r.num END,
               coalesce(nullif(trim(r.text_raw), ''), CASE WHEN coalesce(r.value_concept, 0) <> 0 THEN coalesce(vc.description, CAST(r.value_concept AS VARCHAR)) END),
               '{name}', nullif(r.visit_id, 0), nullif(trim(r.unit), ''), r.concept_id
        FROM clin_raw r
        LEFT JOIN concepts c ON c.concept_id = r.concept_id
        LEFT JOIN concepts vc ON vc.concept_id = r.value_concept
        WHERE r.drop_reason IS NULL
    """,
    )
    _tally(con, stats, name, "clin_raw", kept)
    _count(
        stats,
        "repaired",
        name,
        {
            "unparsable_value (value set to null)": bad_num,
            "dangling_visit_id (re-attached by date)": dangling,
            "unparsable_visit_id (re-attached by date)": bad_visit,
        },
    )
    con.execute("DROP TABLE clin_raw")


def _death(con: duckdb.DuckDBPyConnection, t: OmopTables, stats: dict) -> None:
    col = lambda n: t.col("death", n)  # noqa: E731
    has = lambda *n: present(t, "death", *n)  # noqa: E731
    tag_reasons(
        con,
        "death_raw",
        f"""
        SELECT TRY_CAST({col("person_id")} AS BIGINT) AS person_id, {has("person_id")} AS pid_given,
               {event_time(t, "death", ("death_datetime",), ("death_date",))} AS t,
               {has("death_datetime", "death_date")} AS t_given
        FROM omop_death
    """,
        REF_REASONS + time_reasons(),
        dedupe=("duplicate_death (earliest kept)", "person_id", "t"),
    )
    kept = _inserted(
        con,
        """
        INSERT INTO events (subject_id, time, code, src_table)
        SELECT person_id, t, 'MEDS_DEATH', 'death' FROM death_raw WHERE drop_reason IS NULL
    """,
    )
    _tally(con, stats, "death", "death_raw", kept)
    con.execute("DROP TABLE death_raw")
