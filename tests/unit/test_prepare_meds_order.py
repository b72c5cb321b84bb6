"""write_meds: the rows come out in the full total order of every column, whatever DuckDB's batching; the
sharded prepare's MEDS copy (`meds_gather`) writes the same bytes."""

from __future__ import annotations

import datetime as dt
import random

import pyarrow.parquet as pq
import pytest
from meds import DataSchema

from cehrx.data import duck
from cehrx.data.omop_to_meds import EVENTS_DDL
from cehrx.export import meds_gather
from cehrx.export.meds import SplitWriters, write_meds

FULL_ORDER = """ORDER BY s.split, e.subject_id, e.time NULLS FIRST, e.code, e.numeric_value, e.text_value, e.src_table,
                e.visit_id, e.visit_end, e.unit, e.omop_concept_id"""


def events_with_ties(con, seed: int = 0) -> None:
    """Many rows equal on (subject, time, code) that differ in every later column, nulls included, inserted shuffled."""
    rng = random.Random(seed)
    t0 = dt.datetime(2020, 1, 1, 8)
    rows = []
    for subject in range(1, 13):
        rows.append((subject, None, "STATIC/X", None, None, "person", None, None, None, None))
        for _ in range(40):
            t = t0 + dt.timedelta(hours=rng.choice([0, 0, 1]))
            rows.append(
                (
                    subject,
                    t,
                    rng.choice(["A/1", "A/1", "B/2", "C"]),
                    rng.choice([None, 1.0, -0.5, 2.25, 1e-9]),
                    rng.choice([None, "x", "y", "ä"]),
                    rng.choice(["measurement", "observation", None]),
                    rng.choice([None, 7, 3]),
                    rng.choice([None, t0, t0 + dt.timedelta(days=1)]),
                    rng.choice([None, "mg", "g"]),
                    rng.choice([None, 11, 5]),
                )
            )
    rng.shuffle(rows)
    con.execute(EVENTS_DDL)
    con.executemany("INSERT INTO events VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?)", rows)
    con.execute(
        "CREATE TABLE code_meta AS SELECT DISTINCT code, NULL::VARCHAR AS description, NULL::BIGINT AS omop_concept_id, "
        "NULL::VARCHAR AS omop_domain FROM events ORDER BY code"
    )
    con.execute(
        "CREATE TABLE subject_split AS SELECT DISTINCT subject_id, CASE WHEN subject_id % 3 = 0 THEN 'tuning' "
        "WHEN subject_id = 4 THEN 'held_out' ELSE 'train' END AS split FROM events"
    )


@pytest.mark.parametrize("batch_rows", [7, 1_000_000])
def test_rows_in_full_order(tmp_path, batch_rows):
    con = duck.connect(None)
    events_with_ties(con)
    n = write_meds(con, tmp_path / "meds", "ties", batch_rows=batch_rows)
    assert n == con.execute("SELECT count(*) FROM events").fetchall()[0][0]
    for split in ("train", "tuning", "held_out"):
        expected = con.sql(f"""
            SELECT e.subject_id, e.time, e.code, CAST(e.numeric_value AS FLOAT) AS numeric_value, e.text_value,
                   e.src_table AS "table", e.visit_id, e.visit_end, e.unit, e.omop_concept_id
            FROM events e JOIN subject_split s USING (subject_id) WHERE s.split = '{split}' {FULL_ORDER}
        """).to_arrow_table()
        got = pq.read_table(tmp_path / "meds" / "data" / split / "0.parquet")
        assert got.equals(DataSchema.align(expected)), split


def test_same_bytes_whatever_the_batches(tmp_path):
    """Row groups have a fixed size, so the files do not depend on how DuckDB batches its result."""
    files = []
    for batch_rows in (5, 1_000_000):
        con = duck.connect(None)
        events_with_ties(con)
        write_meds(con, tmp_path / str(batch_rows), "ties", batch_rows=batch_rows)
        files.append((tmp_path / str(batch_rows) / "data" / "train" / "0.parquet").read_bytes())
    assert files[0] == files[1]


def test_shards_parts_gather_into_the_same_bytes(tmp_path, monkeypatch):
    """Each subject shard writes its part (`write_part`), and `gather_split` merges them: the files of
    `write_meds` over all subjects, with row groups and read batches that cut subjects (and a shard
    without rows of a split)."""
    monkeypatch.setattr(SplitWriters, "ROW_GROUP", 16)
    monkeypatch.setattr(meds_gather, "BATCH", 5)
    con = duck.connect(None)
    events_with_ties(con)
    write_meds(con, tmp_path / "single", "ties", batch_rows=9)
    parts = []
    for k, shard in enumerate(
        ("subject_id IN (1, 5, 9, 12)", "subject_id IN (2, 3, 7, 8, 11)", "subject_id IN (4, 6, 10)")
    ):
        part = duck.connect(None)
        for table in ("events", "subject_split"):
            rows = con.sql(f"SELECT * FROM {table} WHERE {shard}").to_arrow_table()  # noqa: F841 (read by DuckDB)
            part.execute(f"CREATE TABLE {table} AS SELECT * FROM rows")
        meds_gather.write_part(part, tmp_path / str(k), batch_rows=7)
        parts.append(tmp_path / str(k))
    assert not (tmp_path / "0" / "held_out.parquet").exists()
    for split in ("train", "tuning", "held_out"):
        n = meds_gather.gather_split([p / f"{split}.parquet" for p in parts], split, tmp_path / "sharded")
        got = (tmp_path / "sharded" / split / "0.parquet").read_bytes()
        assert got == (tmp_path / "single" / "data" / split / "0.parquet").read_bytes(), split
        assert n == pq.read_metadata(tmp_path / "single" / "data" / split / "0.parquet").num_rows
    assert pq.read_metadata(tmp_path / "sharded" / "train" / "0.parquet").num_row_groups > 3
