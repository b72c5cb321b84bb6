"""Bad input from a new user's small hand-made OMOP tables (issue #23): an error, or a finished output that says what it dropped.

Never a finished output with no subject or no clinical event; every drop counted under its true reason;
a missing column named with its file and table, on one line, exit status 2.
"""

from __future__ import annotations

import datetime as dt
import subprocess
import sys
from pathlib import Path

import duckdb
import pytest

from cehrx.errors import DataError
from cehrx.tasks import prepare
from tests.conftest import REPO, assert_counts_balance, compose_cfg


def write_csv(root: Path, **tables: str) -> Path:
    """One csv per table, given as its text (header line first)."""
    root.mkdir(parents=True, exist_ok=True)
    for name, body in tables.items():
        (root / f"{name}.csv").write_text(body.strip() + "\n")
    return root


TWO_PATIENTS = {
    "person": "person_id,gender_concept_id,year_of_birth\n1,8532,1980\n2,8507,1975",
    "condition_occurrence": "person_id,condition_concept_id,condition_start_date\n1,201826,2020-01-01\n2,201826,2020-02-02\n2,320128,2020-03-03",
}


ALL_TRAIN = ("task.splits.train=1", "task.splits.tuning=0", "task.splits.held_out=0")  # every subject in train


def run(src: Path, out: Path, *overrides: str) -> dict:
    return prepare.run(compose_cfg("task=prepare", "data=omop", f"data.path={src}", f"output_dir={out}", *overrides))


def test_every_code_below_min_subjects_is_an_error_naming_it(tmp_path):
    """The issue's report: two patients, default min_subjects=5; it used to finish with 0 events."""
    src = write_csv(tmp_path / "src", **TWO_PATIENTS)
    with pytest.raises(
        DataError,
        match=r"no clinical code is kept: .* fewer than task\.min_subjects=5 .*lower it \(task\.min_subjects=1\)",
    ):
        run(src, tmp_path / "out")
    assert not (tmp_path / "out").exists(), "no finished (or half-written) output"
    report = run(src, tmp_path / "out", "task.min_subjects=1", *ALL_TRAIN)
    assert_counts_balance(tmp_path / "out", report)
    assert report["events"]["tokenized"] == 3


def test_person_without_gender_or_birth_column_exits_2_with_one_line(tmp_path):
    """Through the CLI: `cehrx: error: ...` naming the file, table and column, exit 2, no traceback."""
    src = write_csv(
        tmp_path / "src",
        person="person_id,race_concept_id\n1,8527\n2,8527",
        condition_occurrence=TWO_PATIENTS["condition_occurrence"],
    )
    done = subprocess.run(
        [
            sys.executable,
            "-m",
            "cehrx",
            "task=prepare",
            "data=omop",
            f"data.path={src}",
            f"output_dir={tmp_path / 'out'}",
        ],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert done.returncode == 2, done.stderr
    assert "Traceback" not in done.stderr
    error = [line for line in done.stderr.splitlines() if line.startswith("cehrx: error:")]
    assert error == [
        f"cehrx: error: OMOP table person ({src / 'person.csv'}) has no column gender_concept_id (it has: person_id, race_concept_id)"
    ]


def test_missing_required_column_names_file_table_and_column(tmp_path):
    src = write_csv(
        tmp_path / "src", person=TWO_PATIENTS["person"], condition_occurrence="person_id,condition_concept_id\n1,201826"
    )
    with pytest.raises(
        DataError,
        match=rf"OMOP table condition_occurrence \({tmp_path / 'src' / 'condition_occurrence.csv'}\) "
        r"has no column condition_start_datetime or condition_start_date \(it has: person_id, condition_concept_id\)",
    ):
        run(src, tmp_path / "out")


def test_drops_are_counted_under_their_true_reason(tmp_path):
    """`not-a-date` is unparsable, not null; a string id is unparsable, not unknown; a person with no event still counts."""
    src = write_csv(
        tmp_path / "src",
        person="person_id,gender_concept_id,year_of_birth\n1,8532,1980\n2,8507,1975\n3,0,\nP4,8507,1990",
        condition_occurrence="person_id,condition_concept_id,condition_start_date\n"
        "1,201826,2020-01-01\n2,201826,not-a-date\n2,201826,\n2,320128,2020-03-03\nx,201826,2020-01-01\n9,201826,2020-01-01\n1,abc,2020-01-01",
    )
    report = run(src, tmp_path / "out", "task.min_subjects=1", *ALL_TRAIN)
    assert_counts_balance(tmp_path / "out", report)
    ev = report["events"]
    assert ev["dropped"]["condition_occurrence"] == {
        "unparsable_date": 1,
        "null_date": 1,
        "unparsable_person_id": 1,
        "unknown_person": 1,
        "unparsable_concept_id": 1,
    }
    assert ev["dropped"]["person"] == {"unparsable_person_id": 1}
    assert ev["repaired"]["person"] == {"no_birth_date (kept, age unknown)": 1}
    assert report["subjects"]["in"] == 3 and report["subjects"]["dropped"] == {"no_events": 1, "no_clinical_events": 0}


def test_utc_offsets_move_times_to_utc(tmp_path):
    """`2020-01-02T10:00:00+02:00` is 08:00 UTC; a cast to TIMESTAMP used to drop the offset (10:00)."""
    src = write_csv(
        tmp_path / "src",
        person=TWO_PATIENTS["person"],
        condition_occurrence="person_id,condition_concept_id,condition_start_datetime\n"
        "1,201826,2020-01-02T10:00:00+02:00\n2,201826,2020-01-02 10:00:00 America/New_York",
    )
    run(src, tmp_path / "out", "task.min_subjects=1", *ALL_TRAIN)
    times = duckdb.sql(
        f"SELECT subject_id, time FROM read_parquet('{tmp_path / 'out' / 'meds' / 'data' / '*' / '*.parquet'}') "
        "WHERE code = 'OMOP_CONCEPT_ID/201826' ORDER BY 1"
    ).fetchall()
    assert times == [(1, dt.datetime(2020, 1, 2, 8)), (2, dt.datetime(2020, 1, 2, 15))]


def test_warns_when_most_events_are_rare_codes(tmp_path):
    """Small inputs are legitimate: finished, but a loud warning naming task.min_subjects."""
    rows = "\n".join(f"{p},{c},2020-01-0{p}" for p in (1, 2, 3) for c in (1, 100 + p, 200 + p, 300 + p))
    src = write_csv(
        tmp_path / "src",
        person="person_id,gender_concept_id,year_of_birth\n1,8532,1980\n2,8507,1975\n3,8507,1990",
        condition_occurrence=f"person_id,condition_concept_id,condition_start_date\n{rows}",
    )
    report = run(src, tmp_path / "out", "task.min_subjects=2", *ALL_TRAIN)
    assert_counts_balance(tmp_path / "out", report)
    assert report["events"]["tokenized"] == 3 and report["events"]["rare_code_events_dropped"] == 9
    assert report["warnings"] == [
        "9 of 12 clinical events (75%) are codes in fewer than task.min_subjects=2 train subjects and were "
        "dropped; lower task.min_subjects for a small data set"
    ]
