"""A fuzz corpus for `prepare`: mutations of small slices of the public OMOP and MEDS sets.

Every mutated input must end in either a one-line `CehrxError` whose message names what is wrong
(the CLI prints it alone and exits 2), with nothing written, or a finished output whose counts
balance (`conftest.assert_counts_balance`). No case may finish an output without subjects or
clinical events. Each case states which of the two it expects, and what it must count.

Slices: the first 60 persons of Eunomia GiBleed (OMOP CDM 5.3), the first 40 subjects of the
MIMIC-IV demo (MEDS) with at most 400 events each, so the corpus runs in well under 2 minutes.
A case is a list of SQL statements run on the slice's tables in DuckDB, the format to write them
in, and optionally a function that damages the written files.
"""

from __future__ import annotations

import re
import shutil
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Callable

import duckdb
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from cehrx.errors import CehrxError
from cehrx.tasks import prepare
from tests.conftest import assert_counts_balance, compose_cfg, shared_data

N_PERSONS, N_SUBJECTS, MAX_EVENTS = 60, 40, 400
OMOP_TABLES = (
    "person",
    "visit_occurrence",
    "condition_occurrence",
    "drug_exposure",
    "procedure_occurrence",
    "measurement",
    "observation",
    "death",
    "concept",
)
CLINICAL = ("condition_occurrence", "drug_exposure", "procedure_occurrence", "measurement", "observation")


@dataclass(frozen=True)
class Case:
    """One mutation: SQL on the slice's tables, the file format, the expected end."""

    name: str
    sql: tuple[str, ...] = ()
    fmt: str = "parquet"  # or "csv"
    error: str | None = None  # a regex the one-line error must match; None: a balanced finished output
    damage: Callable[[Path], None] | None = None  # edits the written files
    check: Callable[[dict], bool] | None = None  # what a finished output's prepare.json must count
    overrides: tuple[str, ...] = field(default=())


def dropped(report: dict, table: str, reason: str) -> int:
    return report["events"]["dropped"].get(table, {}).get(reason, 0)


def repaired(report: dict, table: str, reason: str) -> int:
    return report["events"]["repaired"].get(table, {}).get(reason, 0)


# ---------------------------------------------------------------------------------------------- damage


def non_utf8(table: str, column: str, last: bool = False) -> Callable[[Path], None]:
    """Latin-1 bytes (an e acute, 0xE9) in a csv column: in its first rows, or its last (past what is sniffed)."""

    def damage(root: Path) -> None:
        f = root / f"{table}.csv"
        lines = f.read_bytes().split(b"\n")
        col = lines[0].split(b",").index(column.encode())
        for i in range(len(lines) - 4, len(lines) - 1) if last else range(1, min(4, len(lines) - 1)):
            cells = lines[i].split(b",")
            cells[col] = b"caf\xe9"
            lines[i] = b",".join(cells)
        f.write_bytes(b"\n".join(lines))

    return damage


def truncate(path: str) -> Callable[[Path], None]:
    """Keep the first 100 bytes of a parquet file (no footer: not readable as parquet)."""

    def damage(root: Path) -> None:
        f = root / path
        f.write_bytes(f.read_bytes()[:100])

    return damage


def ragged_row(table: str) -> Callable[[Path], None]:
    """A csv row with two fields where the header has many."""

    def damage(root: Path) -> None:
        with open(root / f"{table}.csv", "ab") as f:
            f.write(b"1,2\n")

    return damage


def invalid_utf8_codes(path: str) -> Callable[[Path], None]:
    """A parquet string column holding bytes that are not UTF-8 (pyarrow writes them unchecked)."""

    def damage(root: Path) -> None:
        f = root / path
        table = pq.read_table(f)
        raw = pa.array(
            [b"caf\xe9" if i % 7 == 0 else c.encode() for i, c in enumerate(table["code"].to_pylist())], pa.binary()
        )
        codes = pa.Array.from_buffers(pa.string(), len(raw), raw.buffers())
        pq.write_table(table.set_column(table.schema.get_field_index("code"), "code", codes), f)

    return damage


def zero_bytes(table: str) -> Callable[[Path], None]:
    def damage(root: Path) -> None:
        for f in root.glob(f"{table}.*"):
            f.unlink()
        (root / f"{table}.csv").write_bytes(b"")

    return damage


def upper_case_files(root: Path) -> None:
    for f in root.glob("*.csv"):
        f.rename(f.with_name(f.stem.upper() + ".csv"))


# ---------------------------------------------------------------------------------------------- OMOP


def some(table: str, set_sql: str, every: int = 5) -> str:
    """UPDATE every `every`-th row of `table` (by rowid)."""
    return f"UPDATE {table} SET {set_sql} WHERE rowid % {every} = 0"


def text(table: str, column: str) -> str:
    """Make a column VARCHAR (to put strings where numbers or dates belong)."""
    return f"ALTER TABLE {table} ALTER {column} TYPE VARCHAR"


OMOP_CASES = [
    Case("baseline"),
    Case("baseline_csv", fmt="csv"),
    # dropped or renamed columns
    Case(
        "drop_concept_column",
        ("ALTER TABLE condition_occurrence DROP COLUMN condition_concept_id",),
        error=r"OMOP table condition_occurrence \(.*condition_occurrence\.parquet\) has no column condition_concept_id",
    ),
    Case(
        "person_without_gender_or_birth",
        (
            "ALTER TABLE person DROP COLUMN gender_concept_id",
            "ALTER TABLE person DROP COLUMN year_of_birth",
            "ALTER TABLE person DROP COLUMN birth_datetime",
        ),
        error=r"OMOP table person \(.*person\.parquet\) has no column gender_concept_id",
    ),
    Case(
        "person_without_birth",
        ("ALTER TABLE person DROP COLUMN year_of_birth", "ALTER TABLE person DROP COLUMN birth_datetime"),
        error=r"OMOP table person .* has no column year_of_birth or birth_datetime",
    ),
    Case(
        "renamed_person_id",
        ("ALTER TABLE drug_exposure RENAME person_id TO patient_id",),
        error=r"OMOP table drug_exposure .* has no column person_id \(it has: .*patient_id",
    ),
    Case(
        "no_date_column",
        (
            "ALTER TABLE measurement DROP COLUMN measurement_date",
            "ALTER TABLE measurement DROP COLUMN measurement_datetime",
        ),
        error=r"OMOP table measurement .* has no column measurement_datetime or measurement_date",
    ),
    Case(
        "renamed_visit_id_column",
        ("ALTER TABLE condition_occurrence RENAME visit_occurrence_id TO visit_id",),
        check=lambda r: r["events"]["rows_kept_by_table"]["condition_occurrence"] > 0,
    ),
    Case("only_the_datetime_column", ("ALTER TABLE condition_occurrence DROP COLUMN condition_start_date",)),
    # wrong types, strings in number columns
    Case(
        "strings_in_id_and_concept_columns",
        (
            text("drug_exposure", "person_id"),
            some("drug_exposure", "person_id = 'P' || person_id"),
            text("procedure_occurrence", "procedure_concept_id"),
            some("procedure_occurrence", "procedure_concept_id = 'abc'", 7),
        ),
        check=lambda r: (
            dropped(r, "drug_exposure", "unparsable_person_id") > 0
            and dropped(r, "procedure_occurrence", "unparsable_concept_id") > 0
        ),
    ),
    Case(
        "strings_in_values_csv",
        (some("measurement", "value_as_number = 'n/a'", 3), some("measurement", "value_as_number = '7.5'", 2)),
        fmt="csv",
        check=lambda r: repaired(r, "measurement", "unparsable_value (value set to null)") > 0,
    ),
    Case(
        "dates_as_integers",
        (
            "ALTER TABLE condition_occurrence DROP COLUMN condition_start_datetime",
            "ALTER TABLE condition_occurrence ALTER condition_start_date TYPE BIGINT "
            "USING CAST(strftime(condition_start_date, '%Y%m%d') AS BIGINT)",
        ),
        check=lambda r: (
            dropped(r, "condition_occurrence", "unparsable_date")
            == r["events"]["rows_in_by_table"]["condition_occurrence"]
            and any("condition_occurrence" in w for w in r["warnings"])
        ),
    ),
    Case(
        "unparsable_dates_csv",
        (
            text("drug_exposure", "drug_exposure_start_date"),
            text("drug_exposure", "drug_exposure_start_datetime"),
            some(
                "drug_exposure", "drug_exposure_start_date = 'not-a-date', drug_exposure_start_datetime = '2020-13-45'"
            ),
        ),
        fmt="csv",
        check=lambda r: (
            dropped(r, "drug_exposure", "unparsable_date") > 0 and not dropped(r, "drug_exposure", "null_date")
        ),
    ),
    Case(
        "birth_not_a_date",
        (
            text("person", "birth_datetime"),
            "UPDATE person SET birth_datetime = 'unknown', year_of_birth = NULL WHERE rowid < 5",
        ),
        check=lambda r: repaired(r, "person", "unparsable_birth_date (kept, age unknown)") == 5,
    ),
    Case(
        "huge_year_of_birth",
        (
            "UPDATE person SET year_of_birth = 99999999999, birth_datetime = NULL WHERE rowid < 3",
            "UPDATE person SET month_of_birth = 13, birth_datetime = NULL WHERE rowid BETWEEN 3 AND 5",
        ),
    ),
    # nulls
    Case(
        "nulls",
        (
            some("condition_occurrence", "person_id = NULL", 11),
            some("condition_occurrence", "condition_start_date = NULL, condition_start_datetime = NULL", 7),
            some("drug_exposure", "drug_concept_id = NULL", 5),
            some("visit_occurrence", "visit_start_date = NULL, visit_start_datetime = NULL", 3),
        ),
        check=lambda r: (
            dropped(r, "condition_occurrence", "null_person_id") > 0
            and dropped(r, "condition_occurrence", "null_date") > 0
            and dropped(r, "drug_exposure", "concept_0") > 0
            and dropped(r, "visit_occurrence", "null_start_date") > 0
        ),
    ),
    Case(
        "null_demographics",
        (
            "UPDATE person SET gender_concept_id = NULL, race_concept_id = NULL, ethnicity_concept_id = NULL, "
            "year_of_birth = NULL, birth_datetime = NULL",
        ),
        check=lambda r: repaired(r, "person", "no_birth_date (kept, age unknown)") == N_PERSONS,
    ),
    Case(
        "null_person_ids",
        ("UPDATE person SET person_id = NULL WHERE rowid < 4",),
        check=lambda r: dropped(r, "person", "null_person_id") == 4 and r["subjects"]["in"] == N_PERSONS - 4,
    ),
    # duplicated ids
    Case(
        "duplicate_persons_and_visits",
        (
            "INSERT INTO person SELECT * REPLACE (year_of_birth + 1 AS year_of_birth) FROM person WHERE rowid < 7",
            "INSERT INTO visit_occurrence SELECT * FROM visit_occurrence WHERE rowid < 3",
            "INSERT INTO death SELECT person_id, DATE '2019-01-01', NULL, 0, 0, NULL, 0 FROM person WHERE rowid < 4",
            "INSERT INTO death SELECT person_id, DATE '2019-02-01', NULL, 0, 0, NULL, 0 FROM person WHERE rowid < 2",
        ),
        check=lambda r: (
            dropped(r, "person", "duplicate_person_id") == 7
            and dropped(r, "death", "duplicate_death (earliest kept)") == 2
            and r["subjects"]["in"] == N_PERSONS
        ),
    ),
    Case("duplicate_event_rows", ("INSERT INTO condition_occurrence SELECT * FROM condition_occurrence",)),
    # dates in the future or before 1900
    Case(
        "future_dates",
        (
            some(
                "condition_occurrence",
                "condition_start_date = DATE '2150-06-01', condition_start_datetime = DATE '2150-06-01'",
            ),
            "UPDATE person SET year_of_birth = 2999, birth_datetime = NULL WHERE rowid < 2",
        ),
        check=lambda r: repaired(r, "person", "birth_year_in_future (kept, age unknown)") == 2,
    ),
    Case(
        "dates_before_1900",
        (
            some("drug_exposure", "drug_exposure_start_date = DATE '1850-01-01', drug_exposure_start_datetime = NULL"),
            some("measurement", "measurement_date = DATE '0001-01-01', measurement_datetime = NULL", 50),
            "UPDATE person SET year_of_birth = 1801, birth_datetime = NULL WHERE rowid < 3",
        ),
    ),
    # encodings, names, empty tables
    Case(
        "non_utf8_in_a_read_column",
        fmt="csv",
        damage=non_utf8("concept", "concept_name"),
        error=r"cannot read OMOP table concept \(.*concept\.csv\): .*not utf-8 encoded",
    ),
    Case(
        "non_utf8_in_an_unread_column",
        fmt="csv",
        damage=non_utf8("person", "person_source_value"),
        error=r"cannot read OMOP table person \(.*person\.csv\): .*not utf-8 encoded",
    ),
    Case(
        "non_utf8_after_the_sniffed_rows",
        ("INSERT INTO condition_occurrence SELECT c.* FROM condition_occurrence c, range(16)",),
        fmt="csv",
        damage=non_utf8("condition_occurrence", "condition_concept_id", last=True),
        error=r"cannot read OMOP table condition_occurrence \(.*condition_occurrence\.csv\): .*not utf-8 encoded",
    ),
    Case(
        "upper_case_names_csv",
        ("ALTER TABLE person RENAME person_id TO PERSON_ID",),
        fmt="csv",
        damage=upper_case_files,
    ),
    Case("upper_case_column_names", tuple(f"ALTER TABLE {t} RENAME person_id TO PERSON_ID" for t in CLINICAL)),
    Case(
        "empty_clinical_table",
        ("DELETE FROM condition_occurrence",),
        check=lambda r: r["events"]["rows_in_by_table"]["condition_occurrence"] == 0,
    ),
    Case("empty_table_without_columns", fmt="csv", damage=zero_bytes("observation")),
    Case(
        "ragged_csv_row",
        fmt="csv",
        damage=ragged_row("condition_occurrence"),
        error=r"cannot read OMOP table condition_occurrence \(.*condition_occurrence\.csv\): its rows cannot be split",
    ),
    Case(
        "all_clinical_tables_empty",
        tuple(f"DELETE FROM {t}" for t in CLINICAL),
        error=r"no clinical events in .*: every event is a birth, death, gender, race, visit or static code \(person: 60 rows",
    ),
    Case("empty_person", ("DELETE FROM person",), error=r"OMOP table person \(.*person\.parquet\) has no rows"),
    Case(
        "person_zero_bytes",
        fmt="csv",
        damage=zero_bytes("person"),
        error=r"OMOP table person \(.*person\.csv\) has no rows",
    ),
    Case(
        "unknown_persons_only",
        tuple(f"UPDATE {t} SET person_id = person_id + 10000000" for t in (*CLINICAL, "visit_occurrence")),
        error=r"no clinical events in .*condition_occurrence: \d+ rows, dropped unknown_person \d+",
    ),
    Case(
        "corrupt_parquet",
        damage=truncate("drug_exposure.parquet"),
        error=r"cannot read OMOP table drug_exposure \(.*drug_exposure\.parquet\)",
    ),
    # time zones
    Case(
        "datetimes_with_utc_offsets",
        (
            text("drug_exposure", "drug_exposure_start_datetime"),
            "UPDATE drug_exposure SET drug_exposure_start_datetime = drug_exposure_start_date || 'T10:00:00+05:00'",
        ),
        fmt="csv",
    ),
    Case(
        "timestamptz_columns",
        (
            "ALTER TABLE condition_occurrence ALTER condition_start_datetime TYPE TIMESTAMPTZ "
            "USING CAST(condition_start_datetime AS TIMESTAMP) + INTERVAL 9 HOUR",
        ),
    ),
    # settings that keep nothing
    Case(
        "min_subjects_above_every_code",
        overrides=("task.min_subjects=1000",),
        error=r"no clinical code is kept: each of the \d+ codes of the \d+ train subjects is in fewer than task\.min_subjects=1000 "
        r"of them \(at most \d+\).*lower it \(task\.min_subjects=\d+\)",
    ),
    Case(
        "no_train_split",
        overrides=("task.splits.train=0", "task.splits.tuning=0.5", "task.splits.held_out=0.5"),
        error=r"no train subject has a clinical event",
    ),
]


@pytest.fixture(scope="module")
def omop_slice(tmp_path_factory) -> Path:
    """The first N_PERSONS persons of GiBleed and their rows, one parquet file per table."""
    src = shared_data("omop_eunomia_gibleed/parquet")
    root = tmp_path_factory.mktemp("omop_slice")
    con = duckdb.connect()
    con.execute(
        f"CREATE TABLE ids AS SELECT person_id FROM read_parquet('{src / 'person.parquet'}') ORDER BY person_id LIMIT {N_PERSONS}"
    )
    for t in OMOP_TABLES:
        where = "" if t == "concept" else "WHERE person_id IN (SELECT person_id FROM ids)"
        con.execute(
            f"COPY (SELECT * FROM read_parquet('{src / (t + '.parquet')}') {where}) TO '{root / (t + '.parquet')}' (FORMAT parquet)"
        )
    return root


def write_case(base: Path, dst: Path, case: Case, tables: tuple[str, ...]) -> Path:
    """Load the slice's tables (or MEDS rows) into DuckDB, run the case's SQL, write them out, damage them."""
    dst.mkdir(parents=True)
    con = duckdb.connect()
    con.execute("SET TimeZone = 'UTC'")
    for t in tables:
        con.execute(f"CREATE TABLE {t} AS SELECT * FROM read_parquet('{base / (t + '.parquet')}')")
    for sql in case.sql:
        con.execute(sql)
    for t in tables:
        if case.fmt == "csv":
            con.execute(f"COPY {t} TO '{dst / (t + '.csv')}' (HEADER)")
        else:
            con.execute(f"COPY {t} TO '{dst / (t + '.parquet')}' (FORMAT parquet)")
    con.close()
    if case.damage:
        case.damage(dst)
    return dst


def run_case(case: Case, src: Path, out: Path, data: str) -> None:
    """Prepare `src`; assert the case's expected end: a one-line error and nothing written, or a balanced output."""
    cfg = compose_cfg(
        "task=prepare",
        f"data={data}",
        f"data.path={src}",
        f"output_dir={out}",
        "task.duckdb.threads=2",
        *case.overrides,
    )
    if case.error:
        with pytest.raises(CehrxError) as e:
            prepare.run(cfg)
        message = str(e.value)
        assert "\n" not in message, f"not one line: {message!r}"
        assert re.search(case.error, message), message
        assert not out.exists() and not list(out.parent.glob(f".{out.name}.tmp-*")), "nothing half-written"
        return
    report = prepare.run(cfg)
    assert_counts_balance(out, report)
    if case.check:
        assert case.check(report), report["events"]


@pytest.mark.parametrize("case", OMOP_CASES, ids=lambda c: c.name)
def test_omop_fuzz(case: Case, omop_slice: Path, tmp_path: Path) -> None:
    src = write_case(omop_slice, tmp_path / "src", case, OMOP_TABLES)
    run_case(case, src, tmp_path / "out", "omop")


# ---------------------------------------------------------------------------------------------- MEDS

MEDS_CASES = [
    Case("baseline"),
    Case(
        "drop_code_column",
        ("ALTER TABLE data DROP COLUMN code",),
        error=r"0\.parquet is not MEDS data: missing column\(s\) code",
    ),
    Case(
        "meds_0_3_patient_id",
        ("ALTER TABLE data RENAME subject_id TO patient_id",),
        error=r"is not MEDS data: missing column\(s\) subject_id \(it has: patient_id",
    ),
    Case(
        "upper_case_columns",
        ("ALTER TABLE data RENAME subject_id TO SUBJECT_ID", "ALTER TABLE data RENAME code TO CODE"),
        error=r"is not MEDS data: missing column\(s\) code, subject_id",
    ),
    Case(
        "nulls",
        (
            some("data", "subject_id = NULL", 13),
            some("data", "code = NULL", 17),
            "UPDATE data SET time = NULL WHERE rowid % 19 = 0 AND code NOT LIKE 'MEDS_BIRTH%'",
        ),
        check=lambda r: (
            dropped(r, "meds", "null_subject_id") > 0
            and dropped(r, "meds", "null_code") > 0
            and r["events"]["not_code_tokens"]["static, not in the prompt"] > 0
        ),
    ),
    Case(
        "strings_in_numeric_value",
        (text("data", "numeric_value"), some("data", "numeric_value = 'n/a'", 3)),
        check=lambda r: repaired(r, "meds", "unparsable_value (value set to null)") > 0,
    ),
    Case(
        "subject_id_as_text",
        (
            text("data", "subject_id"),
            "UPDATE data SET subject_id = 'S' || subject_id WHERE subject_id = (SELECT min(subject_id) FROM data)",
        ),
        check=lambda r: dropped(r, "meds", "unparsable_subject_id") > 0,
    ),
    Case(
        "times_as_text_with_offsets",
        (
            text("data", "time"),
            "UPDATE data SET time = strftime(CAST(time AS TIMESTAMP), '%Y-%m-%dT%H:%M:%S') || '+02:00'",
            "UPDATE data SET time = 'yesterday' WHERE rowid % 23 = 0 AND time IS NOT NULL",
        ),
        check=lambda r: dropped(r, "meds", "unparsable_time") > 0,
    ),
    Case("timestamptz", ("ALTER TABLE data ALTER time TYPE TIMESTAMPTZ USING CAST(time AS TIMESTAMP)",)),
    Case("duplicated_rows", ("INSERT INTO data SELECT * FROM data WHERE rowid % 4 = 0",)),
    Case(
        "future_and_pre_1900_dates",
        (
            some("data", "time = TIMESTAMP '2350-01-01 10:00:00'", 31),
            "UPDATE data SET time = time - INTERVAL 300 YEAR WHERE code = 'MEDS_BIRTH' AND rowid % 2 = 0",
        ),
    ),
    Case(
        "non_utf8_codes",
        (
            "ALTER TABLE data ALTER code TYPE BLOB USING CASE WHEN code LIKE 'LAB//5%' THEN '\\xE9\\xFF'::BLOB "
            "ELSE encode(code) END",
        ),
    ),
    Case("one_empty_shard", ("DELETE FROM data WHERE split = 'held_out'",)),
    Case(
        "all_shards_empty",
        ("DELETE FROM data",),
        error=r"nothing to prepare in .*: no row became an event \(meds: 0 rows\)",
    ),
    Case("only_codes_below_min_subjects", overrides=("task.min_subjects=1000",), error=r"task\.min_subjects=1000"),
    Case(
        "invalid_utf8_in_a_string_column",
        damage=invalid_utf8_codes("data/train/0.parquet"),
        error=r"cannot read MEDS data .*: .*train/0\.parquet.* is not valid UTF8",
    ),
    Case(
        "truncated_shard",
        damage=truncate("data/tuning/0.parquet"),
        error=r"cannot read .*tuning/0\.parquet: .*corrupted",
    ),
    Case(
        "corrupt_codes_metadata",
        damage=truncate("metadata/codes.parquet"),
        error=r"cannot read .*metadata/codes\.parquet: .*corrupted",
    ),
    Case(
        "corrupt_splits_metadata",
        damage=truncate("metadata/subject_splits.parquet"),
        error=r"cannot read splits file .*subject_splits\.parquet: ",
    ),
]


@pytest.fixture(scope="module")
def meds_slice(tmp_path_factory) -> Path:
    """The first N_SUBJECTS subjects of the MIMIC-IV demo, at most MAX_EVENTS events each, as one table `data`."""
    src = shared_data("meds_mimic_iv_demo")
    root = tmp_path_factory.mktemp("meds_slice")
    duckdb.sql(f"""
        COPY (
            SELECT subject_id, time, code, numeric_value, text_value, unit, split FROM (
                SELECT *, regexp_extract(filename, '.*/data/([^/]+)/[^/]+$', 1) AS split
                FROM read_parquet('{src / "data" / "*" / "*.parquet"}', filename = true))
            WHERE subject_id IN (SELECT DISTINCT subject_id FROM read_parquet('{src / "data" / "*" / "*.parquet"}') ORDER BY 1 LIMIT {N_SUBJECTS})
            QUALIFY row_number() OVER (PARTITION BY subject_id ORDER BY time NULLS FIRST, code, numeric_value) <= {MAX_EVENTS}
            ORDER BY subject_id, time NULLS FIRST, code
        ) TO '{root / "data.parquet"}' (FORMAT parquet)
    """)
    shutil.copytree(src / "metadata", root / "metadata")
    return root


def write_meds(base: Path, dst: Path, case: Case) -> Path:
    """The case's MEDS dataset: `data/<split>/0.parquet` from the mutated table, the slice's metadata."""
    flat = write_case(base, dst / "flat", replace(case, damage=None), ("data",))
    for split in ("train", "tuning", "held_out"):
        (dst / "data" / split).mkdir(parents=True)
        duckdb.execute(f"""COPY (SELECT * EXCLUDE (split) FROM read_parquet('{flat / "data.parquet"}') WHERE split = '{split}')
                           TO '{dst / "data" / split / "0.parquet"}' (FORMAT parquet)""")
    shutil.rmtree(flat)
    shutil.copytree(base / "metadata", dst / "metadata")
    if case.damage:
        case.damage(dst)
    return dst


@pytest.mark.parametrize("case", MEDS_CASES, ids=lambda c: c.name)
def test_meds_fuzz(case: Case, meds_slice: Path, tmp_path: Path) -> None:
    src = write_meds(meds_slice, tmp_path / "src", case)
    run_case(case, src, tmp_path / "out", "meds")
