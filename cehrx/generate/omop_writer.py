"""Write staged synthetic patients (`cehrx.generate.staging`) as OMOP CDM 5.4 parquet tables.

`<out>/<table>.parquet` for person, observation_period, visit_occurrence, condition_occurrence,
drug_exposure, procedure_occurrence, device_exposure, measurement, observation, death and
concept, with the CDM 5.4 columns in order and the types of `cehrx.generate.cdm`.

- Ids are fresh: person_id = the synthetic subject_id; every other id numbers its table's rows
  from 1 in (person, time, code) order.
- Clinical codes go to the table of their OMOP domain (`concepts.build_concept_map`); values go
  to `value_as_number` (measurement and observation only). `*_source_value` holds the MEDS code.
- Dates: an event at 23:59:59 is date-only (DESIGN §3), so its `*_datetime` is null and
  `prepare` places it at 23:59:59 again; other times are written as datetimes.
- Type concepts (`*_type_concept_id`) take `type_concept_id` (default 0 = "No matching
  concept": OMOP has no type concept for model-generated records; set your site's choice).
- `concept`: the source's own concept rows for every concept id used (or the whole table
  with `concepts="all"`) when the source was OMOP with a concept table, plus constructed rows
  for standard demographic/visit concepts and the local (>= 2,000,000,000) concepts.
"""

from __future__ import annotations

from pathlib import Path

import duckdb
import pyarrow as pa
import pyarrow.parquet as pq

from cehrx.data.omop_tables import open_omop
from cehrx.errors import CehrxError
from cehrx.generate.cdm import CDM_TABLES, EVENT_TABLES, schema

DATE_ONLY = "TIME '23:59:59'"


def _dt(col: str) -> str:
    """SQL: the datetime to write for a time (null for date-only 23:59:59 times)."""
    return f"CASE WHEN CAST({col} AS TIME) = {DATE_ONLY} THEN NULL ELSE {col} END"


def write_table(con: duckdb.DuckDBPyConnection, sql: str, table: str, out_dir: Path, batch_rows: int = 500_000) -> int:
    """Run `sql` (which must produce the CDM columns by name) and write `<table>.parquet` with the CDM types."""
    target = schema(table)
    reader = con.sql(sql).to_arrow_reader(batch_rows)
    missing = set(target.names) - set(reader.schema.names)
    if missing:
        raise AssertionError(f"{table}: query lacks CDM columns {sorted(missing)}")
    n = 0
    with pq.ParquetWriter(out_dir / f"{table}.parquet", target, compression="zstd") as writer:
        for batch in reader:
            writer.write_table(pa.Table.from_batches([batch]).select(target.names).cast(target))
            n += batch.num_rows
    return n


def _nulls(table: str, given: set[str]) -> str:
    """`NULL AS col` for the CDM columns a query does not set."""
    return ", ".join(f"NULL AS {c}" for c, _ in CDM_TABLES[table] if c not in given)


def write_omop(
    con: duckdb.DuckDBPyConnection,
    out_dir: Path,
    type_concept_id: int = 0,
    omop_source: str | None = None,
    concepts: str = "used",
) -> dict[str, int]:
    """Write every table; returns rows per table."""
    if concepts not in ("used", "all"):
        raise CehrxError(f"generate.omop_concepts must be 'used' or 'all', got {concepts!r}")
    out_dir.mkdir(parents=True, exist_ok=True)
    tc = int(type_concept_id)
    rows = {
        "person": write_table(con, _person_sql(), "person", out_dir),
        "observation_period": write_table(
            con,
            f"""
            SELECT row_number() OVER (ORDER BY subject_id) AS observation_period_id, subject_id AS person_id,
                   CAST(first_t AS DATE) AS observation_period_start_date,
                   CAST(greatest(last_t, coalesce(death, last_t)) AS DATE) AS observation_period_end_date,
                   {tc} AS period_type_concept_id
            FROM gen_persons ORDER BY subject_id""",
            "observation_period",
            out_dir,
        ),
        "visit_occurrence": write_table(con, _visit_sql(tc), "visit_occurrence", out_dir),
    }
    for table in EVENT_TABLES:
        rows[table] = write_table(con, _event_sql(table, tc), table, out_dir)
    rows["death"] = write_table(
        con,
        f"""
        SELECT subject_id AS person_id, CAST(death AS DATE) AS death_date, {_dt("death")} AS death_datetime,
               {tc} AS death_type_concept_id, 0 AS cause_concept_id, 0 AS cause_source_concept_id,
               {_nulls("death", {"person_id", "death_date", "death_datetime", "death_type_concept_id", "cause_concept_id", "cause_source_concept_id"})}
        FROM gen_persons WHERE death IS NOT NULL ORDER BY subject_id""",
        "death",
        out_dir,
    )
    rows["concept"] = _write_concepts(con, out_dir, omop_source, concepts)
    return rows


def _person_sql() -> str:
    given = {
        "person_id",
        "gender_concept_id",
        "year_of_birth",
        "month_of_birth",
        "day_of_birth",
        "birth_datetime",
        "race_concept_id",
        "ethnicity_concept_id",
        "person_source_value",
        "gender_source_value",
        "gender_source_concept_id",
        "race_source_value",
        "race_source_concept_id",
        "ethnicity_source_concept_id",
    }
    return f"""
        SELECT p.subject_id AS person_id, coalesce(g.concept_id, 0) AS gender_concept_id,
               year(p.birth) AS year_of_birth, month(p.birth) AS month_of_birth, day(p.birth) AS day_of_birth,
               p.birth AS birth_datetime, coalesce(r.concept_id, 0) AS race_concept_id, 0 AS ethnicity_concept_id,
               CAST(p.subject_id AS VARCHAR) AS person_source_value, g.meds_code AS gender_source_value, 0 AS gender_source_concept_id,
               r.meds_code AS race_source_value, 0 AS race_source_concept_id, 0 AS ethnicity_source_concept_id,
               {_nulls("person", given)}
        FROM gen_persons p LEFT JOIN concept_map g ON g.key = p.gender LEFT JOIN concept_map r ON r.key = p.race
        ORDER BY p.subject_id"""


def _visit_sql(tc: int) -> str:
    given = {
        "visit_occurrence_id",
        "person_id",
        "visit_concept_id",
        "visit_start_date",
        "visit_start_datetime",
        "visit_end_date",
        "visit_end_datetime",
        "visit_type_concept_id",
        "visit_source_value",
        "visit_source_concept_id",
        "admitted_from_concept_id",
        "discharged_to_concept_id",
        "discharged_to_source_value",
        "preceding_visit_occurrence_id",
    }
    return f"""
        SELECT v.visit_occurrence_id, v.subject_id AS person_id, coalesce(m.concept_id, 0) AS visit_concept_id,
               CAST(v.start_t AS DATE) AS visit_start_date, {_dt("v.start_t")} AS visit_start_datetime,
               CAST(v.end_t AS DATE) AS visit_end_date, {_dt("v.end_t")} AS visit_end_datetime,
               {tc} AS visit_type_concept_id, m.meds_code AS visit_source_value, 0 AS visit_source_concept_id,
               0 AS admitted_from_concept_id, coalesce(d.concept_id, 0) AS discharged_to_concept_id,
               d.meds_code AS discharged_to_source_value,
               lag(v.visit_occurrence_id) OVER (PARTITION BY v.subject_id ORDER BY v.visit) AS preceding_visit_occurrence_id,
               {_nulls("visit_occurrence", given)}
        FROM visits v LEFT JOIN concept_map m ON m.key = v.vtoken
        LEFT JOIN concept_map d ON d.key = 'DISCHARGE//' || v.discharge
        ORDER BY v.visit_occurrence_id"""


def _event_sql(table: str, tc: int) -> str:
    id_col, concept_col, prefix = EVENT_TABLES[table]
    date_col, dt_col = f"{prefix}_date", f"{prefix}_datetime"
    stem = table.split("_")[0]
    cols = {
        id_col: "row_number() OVER (ORDER BY e.subject_id, e.time, e.code, e.numeric_value)",
        "person_id": "e.subject_id",
        concept_col: "coalesce(e.omop_concept_id, 0)",
        date_col: "CAST(e.time AS DATE)",
        dt_col: _dt("e.time"),
        f"{stem}_type_concept_id": str(tc),
        "visit_occurrence_id": "e.visit_id",
        f"{stem}_source_value": "e.code",
        f"{stem}_source_concept_id": "0",
    }
    if table == "drug_exposure":  # required in CDM 5.4: a single-day exposure
        cols["drug_exposure_end_date"] = "CAST(e.time AS DATE)"
    if table in ("measurement", "observation"):
        cols["value_as_number"] = "e.numeric_value"
    select = ", ".join(f"{expr} AS {name}" for name, expr in cols.items())
    return f"""
        SELECT {select}, {_nulls(table, set(cols))}
        FROM events e WHERE e.src_table = '{table}'
        ORDER BY e.subject_id, e.time, e.code, e.numeric_value"""


def _write_concepts(con: duckdb.DuckDBPyConnection, out_dir: Path, omop_source: str | None, which: str) -> int:
    """Source concept rows (used ids or all) + constructed rows for ids the source lacks."""
    con.execute("""
        CREATE OR REPLACE TEMP TABLE made_concepts AS
        SELECT concept_id, any_value(coalesce(description, meds_code)) AS concept_name, any_value(domain) AS domain_id,
               any_value(vocabulary_id) AS vocabulary_id, any_value(concept_code) AS concept_code
        FROM concept_map WHERE origin IN ('source', 'standard', 'local') AND concept_id IS NOT NULL AND concept_id <> 0
        GROUP BY concept_id
    """)
    src = "SELECT NULL::BIGINT AS concept_id, NULL AS concept_name, NULL AS domain_id, NULL AS vocabulary_id, NULL AS concept_class_id, NULL AS standard_concept, NULL AS concept_code, NULL::DATE AS valid_start_date, NULL::DATE AS valid_end_date, NULL AS invalid_reason WHERE false"
    if omop_source:
        tables = open_omop(con, omop_source)
        if tables.has("concept"):
            cols = ", ".join(f"{tables.col('concept', c)} AS {c}" for c, _ in CDM_TABLES["concept"])
            used = (
                ""
                if which == "all"
                else "WHERE TRY_CAST(concept_id AS BIGINT) IN (SELECT concept_id FROM concept_map WHERE concept_id IS NOT NULL)"
            )
            src = f"SELECT * REPLACE (TRY_CAST(concept_id AS BIGINT) AS concept_id, TRY_CAST(valid_start_date AS DATE) AS valid_start_date, TRY_CAST(valid_end_date AS DATE) AS valid_end_date) FROM (SELECT {cols} FROM omop_concept) {used}"
    con.execute(f"CREATE OR REPLACE TEMP TABLE src_concepts AS {src}")
    sql = """
        SELECT * FROM src_concepts
        UNION ALL
        SELECT m.concept_id, m.concept_name, coalesce(m.domain_id, 'Observation'), m.vocabulary_id,
               CASE WHEN m.concept_id >= 2000000000 THEN 'cehrx local' ELSE 'Undefined' END, NULL, m.concept_code,
               DATE '1970-01-01', DATE '2099-12-31', NULL
        FROM made_concepts m WHERE m.concept_id NOT IN (SELECT concept_id FROM src_concepts WHERE concept_id IS NOT NULL)
        ORDER BY 1
    """
    return write_table(con, sql, "concept", out_dir)
