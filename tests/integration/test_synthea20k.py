"""`data=synthea20k` and its ACES tasks on a slice of ../shared/data/synthea20k (a few hundred subjects).

The whole study is not run here (experiments/synthea20k/); these tests check what the study rests on:
every subject and event is accounted for, its Visit/* codes make visits of the right length, every
shipped task runs and gives labels, and an event planted after a prediction time changes no history.
"""

from __future__ import annotations

import datetime as dt
from pathlib import Path

import duckdb
import numpy as np
import pyarrow.compute as pc
import pytest

from cehrx.data.grammar import check_sequence
from cehrx.data.history import cut_histories, load_all_splits
from cehrx.data.shards import SPLITS, load_split
from cehrx.data.vocab import Vocab
from cehrx.probe.labels import available_tasks, extract_labels, times_seconds
from cehrx.tasks import prepare
from tests.conftest import assert_counts_balance, compose_cfg, shared_data

N_SUBJECTS = 300  # subject ids 0..299 of every split (synthea20k ids are 0..19,999)
TASKS = [t for t in available_tasks() if t.startswith("synthea20k_")]


def write_slice(src: Path, out: Path, n: int, extra_rows: list[tuple] = ()) -> Path:
    """A MEDS dataset of `src`'s subjects with id < n (same splits, metadata), plus `extra_rows`
    (subject_id, time, code) appended to the subject's split."""
    con = duckdb.connect()
    for split in SPLITS:
        (out / "data" / split).mkdir(parents=True, exist_ok=True)
        files = sorted(str(f) for f in (src / "data" / split).glob("*.parquet"))
        con.execute(f"CREATE OR REPLACE TABLE s AS SELECT * FROM read_parquet({files!r}) WHERE subject_id < {n}")
        for sid, time, code in extra_rows:
            con.execute(
                "INSERT INTO s (subject_id, time, code) SELECT ?, ?, ? WHERE EXISTS (SELECT 1 FROM s WHERE subject_id = ?)",
                [sid, time, code, sid],
            )
        con.execute(
            f"COPY (SELECT * FROM s ORDER BY subject_id, time) TO '{out / 'data' / split / '0.parquet'}' (FORMAT parquet)"
        )
    (out / "metadata").mkdir(parents=True, exist_ok=True)
    meta = src / "metadata"
    con.execute(
        f"COPY (SELECT * FROM read_parquet('{meta / 'codes.parquet'}')) TO '{out / 'metadata' / 'codes.parquet'}' (FORMAT parquet)"
    )
    con.execute(
        f"COPY (SELECT * FROM read_parquet('{meta / 'subject_splits.parquet'}') WHERE subject_id < {n}) "
        f"TO '{out / 'metadata' / 'subject_splits.parquet'}' (FORMAT parquet)"
    )
    (out / "metadata" / "dataset.json").write_text((meta / "dataset.json").read_text())
    return out


def run_prepare(meds: Path, out: Path) -> dict:
    return prepare.run(compose_cfg("task=prepare", "data=synthea20k", f"data.path={meds}", f"output_dir={out}"))


@pytest.fixture(scope="module")
def sliced(tmp_path_factory) -> tuple[Path, Path, dict]:
    src = shared_data("synthea20k/meds")
    root = tmp_path_factory.mktemp("synthea20k")
    meds = write_slice(src, root / "meds", N_SUBJECTS)
    return meds, root / "prepared", run_prepare(meds, root / "prepared")


def test_every_subject_and_event_is_accounted_for(sliced) -> None:
    meds, out, report = sliced
    s, e, v = report["subjects"], report["events"], report["visits"]
    n_subjects, n_events, n_static = duckdb.sql(f"""
        SELECT count(DISTINCT subject_id), count(*),
               count(*) FILTER (WHERE code IN ('MEDS_BIRTH', 'MEDS_DEATH') OR code LIKE 'Gender/%' OR code LIKE 'Race/%')
        FROM read_parquet('{meds}/data/*/*.parquet')""").fetchall()[0]
    assert s["in"] == n_subjects > 0.9 * N_SUBJECTS
    assert_counts_balance(out, report)
    assert e["in"] == n_events and not e["dropped"]
    # every other event is a token, a discharge token, a start code its visit token replaces, or a rare code
    consumed = v["end_codes_made_discharge_tokens"] + v["start_codes_replaced_by_visit_token"]
    assert e["tokenized"] == n_events - n_static - consumed - e["rare_code_events_dropped"]
    assert v["start_codes_replaced_by_visit_token"] == v["visits_from_source"]


def test_visits_come_from_the_visit_codes_and_sequences_parse(sliced) -> None:
    _, out, report = sliced
    vocab = Vocab.load(out)
    assert {"VISIT//IP", "VISIT//ER", "VISIT//OP"} <= set(vocab.tokens)
    assert report["visits"]["visits_from_source"] > 10 * N_SUBJECTS
    inpatient = set(vocab.meta["inpatient_visit_types"])
    for split in SPLITS:
        arrays = load_split(out, split)
        for i in range(len(arrays)):
            tokens, times = arrays.subject(i)
            assert check_sequence(vocab, tokens, inpatient) is None
            assert (np.diff(times) >= 0).all()


def test_outpatient_visits_without_an_end_code_last_no_time(sliced) -> None:
    """Synthea writes `Visit/OP/END` only for the few outpatient visits that last: the others must not
    run to the end code of a later visit (an end closes only the latest start before it)."""
    _, out, _ = sliced
    vocab = Vocab.load(out)
    vs, ve, op = vocab["[VS]"], vocab["[VE]"], vocab["VISIT//OP"]
    arrays = load_split(out, "train")
    longest = 0
    for i in range(len(arrays)):
        tokens, times = arrays.subject(i)
        starts = np.flatnonzero((tokens[:-1] == vs) & (tokens[1:] == op))
        ends = np.flatnonzero(tokens == ve)
        j = np.searchsorted(ends, starts)
        longest = max(longest, int((times[ends[j]] - times[starts]).max(initial=0)))
    assert longest <= 3 * 86400, f"an outpatient visit lasts {longest / 86400:.0f} days"


def test_meds_visit_pairing_nests_like_parentheses() -> None:
    from cehrx.data.visits import build_source_visits

    con = duckdb.connect()
    con.execute(
        "CREATE TABLE code_ids AS SELECT * FROM (VALUES (1, 'Visit/OP'), (2, 'Visit/OP/END'), (3, 'Visit/IP'), (4, 'Visit/IP/END')) t(cid, code)"
    )
    t = [dt.datetime(2020, 1, d) for d in range(1, 20)]
    con.execute("CREATE TABLE body (subject_id BIGINT, time TIMESTAMP, cid INTEGER)")
    con.executemany(
        "INSERT INTO body VALUES (?, ?, ?)",
        [
            (1, t[0], 1),  # OP with no end: zero length
            (1, t[2], 1),
            (1, t[3], 2),  # OP that lasts a day
            (1, t[4], 3),
            (1, t[8], 4),  # IP over days 5..9 ...
            (1, t[5], 1),  # ... with an OP inside, no end
            (1, t[6], 3),
            (1, t[7], 4),  # ... and a shorter IP stay nested in it
            (1, t[10], 3),
            (1, t[12], 4),  # IP that ends the moment the next one starts
            (1, t[12], 3),
            (1, t[15], 4),
            (2, t[1], 4),  # an end with nothing open: closes nothing
            (2, t[2], 3),
            (2, t[3], 4),
        ],
    )
    patterns = [
        {"type": "OP", "start": "Visit/OP", "end": "Visit/OP/END"},
        {"type": "IP", "start": "Visit/IP", "end": "Visit/IP/END"},
    ]
    build_source_visits(con, "meds", patterns)
    got = con.execute(
        "SELECT subject_id, vtype, vstart, vend, start_eid FROM src_visits ORDER BY subject_id, vstart, vtype"
    ).fetchall()
    assert got == [
        (1, "OP", t[0], t[0], None),
        (1, "OP", t[2], t[3], None),
        (1, "IP", t[4], t[8], None),
        (1, "OP", t[5], t[5], None),
        (1, "IP", t[6], t[7], None),
        (1, "IP", t[10], t[12], None),
        (1, "IP", t[12], t[15], None),
        (2, "IP", t[2], t[3], None),
    ]
    build_source_visits(con, "meds", [{**p, "keep_start_code": False} for p in patterns])
    starts = con.execute("SELECT count(start_eid), count(DISTINCT start_eid) FROM src_visits").fetchall()[0]
    assert starts == (8, 8), "every start event is named once, to be replaced by the visit's own token"


@pytest.mark.parametrize("task", TASKS)
def test_shipped_task_runs_on_the_slice(sliced, task: str) -> None:
    meds, _, _ = sliced
    labels = extract_labels(task, meds)
    assert len(labels) > 0
    y = labels.column("boolean_value")
    assert 0 < (pc.sum(y).as_py() or 0) < len(labels), "both classes occur on 300 subjects"
    end = duckdb.sql(f"SELECT max(time) FROM read_parquet('{meds}/data/*/*.parquet')").fetchall()[0][0]
    days = {"30d": 30, "1y": 365, "3y": 1095}[task.rsplit("_", 1)[1]]
    assert pc.max(labels.column("prediction_time")).as_py() <= end - dt.timedelta(days=days), (
        "follow-up: the window fits in the data"
    )


def test_at_least_eight_tasks_are_shipped() -> None:
    assert len(TASKS) >= 8


def test_a_planted_future_event_changes_no_history(sliced, tmp_path: Path) -> None:
    """Plant an admission, a diagnosis and a death a day after a prediction time, prepare again:
    the histories of every label at or before that time are token for token the same."""
    meds, out, _ = sliced
    labels = extract_labels("synthea20k_t2d_3y", meds)
    row = labels.filter(
        pc.equal(labels.column("subject_id"), labels.column("subject_id")[len(labels) // 2])
    ).to_pylist()[0]
    sid, t = row["subject_id"], row["prediction_time"]
    plant = [
        (sid, t + dt.timedelta(days=1), "Visit/IP"),
        (sid, t + dt.timedelta(days=1), "SNOMED/44054006"),
        (sid, t + dt.timedelta(days=3), "Visit/IP/END"),
        (sid, t + dt.timedelta(days=4), "MEDS_DEATH"),
    ]
    planted_meds = write_slice(shared_data("synthea20k/meds"), tmp_path / "meds", N_SUBJECTS, plant)
    planted_out = tmp_path / "prepared"
    run_prepare(planted_meds, planted_out)
    mine = labels.filter(
        pc.and_(pc.equal(labels.column("subject_id"), sid), pc.less_equal(labels.column("prediction_time"), t))
    )
    secs = times_seconds(mine.column("prediction_time"))
    decoded = []
    for prepared in (out, planted_out):
        vocab = Vocab.load(prepared)
        arrays, _ = load_all_splits(prepared)
        h = cut_histories(arrays, vocab, mine.column("subject_id").to_numpy(), secs, max_len=512)
        decoded.append([vocab.tokens[i] for i in h.tokens])
        times = h.times
    assert decoded[0] == decoded[1]
    assert times.max() <= secs.max()
