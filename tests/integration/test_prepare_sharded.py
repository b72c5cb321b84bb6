"""Prepare at any size (#25): the sharded path writes what the single pass writes, whatever the shard
count, with the work spread over a process pool, and a rerun after a failure redoes only unfinished jobs."""

from __future__ import annotations

import filecmp
import json
import os
import shutil
from dataclasses import replace
from pathlib import Path

import duckdb
import numpy as np
import pyarrow as pa
import pytest

from cehrx.data.sharding import choose_shards, parse_bytes, shard_of, shard_sql
from cehrx.errors import CehrxError, DataError
from cehrx.tasks import prepare, prepare_jobs
from tests.conftest import assert_counts_balance, compose_cfg, shared_data
from tests.integration.test_fuzz_inputs import OMOP_CASES, omop_slice, write_case  # noqa: F401 (fixture)

# data set, its shared folder, shards, workers: odd and even counts, in-process and a spawned pool
DATASETS = {
    "gibleed": ("omop_eunomia_gibleed/parquet", 3, 1),
    "synthea1k": ("omop_synthea1k/csv", 4, 2),
    "mimic_demo": ("meds_mimic_iv_demo", 7, 2),
}
NOT_COMPARED = {"prepare.json", "config.yaml", "dataset.json"}  # timings, settings, creation time


def run(src: Path, out: Path, data: str, *overrides: str) -> dict:
    return prepare.run(compose_cfg("task=prepare", f"data={data}", f"data.path={src}", f"output_dir={out}", *overrides))


def output_files(d: Path) -> list[Path]:
    """The files of a prepared dir, but the SLURM logs that runs through submitit keep in it (`.submitit/`)."""
    return sorted(p.relative_to(d) for p in d.rglob("*") if p.is_file() and ".submitit" not in p.relative_to(d).parts)


def assert_same_output(a: Path, b: Path) -> None:
    """Every file byte for byte (token shards, vocab.json, the MEDS copy), and prepare.json but its timings."""
    files = output_files(a)
    assert files == output_files(b)
    differ = [str(f) for f in files if f.name not in NOT_COMPARED and not filecmp.cmp(a / f, b / f, shallow=False)]
    assert not differ, differ
    ra, rb = (json.loads((d / "prepare.json").read_text()) for d in (a, b))
    for r in (ra, rb):
        r.pop("timings_s")
        r["events"].pop("per_second")
    assert ra == rb


@pytest.mark.parametrize("name", sorted(DATASETS))
def test_sharded_output_is_the_single_pass_output(name: str, tmp_path: Path) -> None:
    rel, shards, workers = DATASETS[name]
    src = shared_data(rel)
    run(src, tmp_path / "single", name)
    report = run(src, tmp_path / "sharded", name, f"task.shards={shards}", f"task.workers={workers}")
    assert_same_output(tmp_path / "single", tmp_path / "sharded")
    assert_counts_balance(tmp_path / "sharded", report)
    assert not (tmp_path / ".sharded.shards").exists(), "the work dir goes once the output is finished"


def test_one_shard_job_at_a_time_then_the_reduce(omop_slice: Path, tmp_path: Path) -> None:
    """The SLURM flow without SLURM: `task.stage=partition` (the parquet tables read once into shards, the
    columns prepare reads), `task.shard=k` jobs (map only), then `task.stage=reduce`."""
    run(omop_slice, tmp_path / "single", "omop")
    with pytest.raises(DataError, match=r"is a folder of OMOP tables: .* task.stage=partition"):
        run(omop_slice, tmp_path / "out", "omop", "task.shards=3", "task.shard=0")
    tables = run(omop_slice, tmp_path / "out", "omop", "task.shards=3", "task.stage=partition")["tables"]
    assert tables["measurement"] == "shards" and "concept" not in tables, "parquet without person_id: read in place"
    assert json.loads((tmp_path / ".out.shards" / "source" / "measurement" / "columns.json").read_text())[0][0]
    for k in range(3):
        assert run(omop_slice, tmp_path / "out", "omop", "task.shards=3", f"task.shard={k}")["events_in"] >= 0
        assert not (tmp_path / "out").exists()
    run(omop_slice, tmp_path / "out", "omop", "task.shards=3", "task.stage=reduce")
    assert_same_output(tmp_path / "single", tmp_path / "out")


def test_a_failed_run_reruns_only_unfinished_shards(omop_slice: Path, tmp_path: Path, monkeypatch) -> None:
    out, work = tmp_path / "out", tmp_path / ".out.shards"
    real, calls = prepare_jobs.load_ordered, []

    def dies_on_shard_2(folder):  # in the tokenize job
        calls.append(1)
        if len(calls) == 3:
            raise MemoryError("killed")
        return real(folder)

    monkeypatch.setattr(prepare_jobs, "load_ordered", dies_on_shard_2)
    with pytest.raises(MemoryError):
        run(omop_slice, out, "omop", "task.shards=4")
    assert not out.exists()
    assert sorted(p.name for p in (work / "tokens").iterdir()) == ["0", "1"], "no half-written shard looks done"
    maps = {k: (work / "map" / str(k) / "done.json").stat().st_mtime_ns for k in range(4)}
    (work / "map" / f".{3}.tmp-{2**22 + 7}-deadbeef").mkdir()  # what a killed process (a dead pid) left
    monkeypatch.setattr(prepare_jobs, "load_ordered", real)
    run(omop_slice, out, "omop", "task.shards=4", "task.keep_work=true")
    calls.clear()
    assert maps == {k: (work / "map" / str(k) / "done.json").stat().st_mtime_ns for k in range(4)}, "maps not redone"
    assert not list((work / "map").glob(".*.tmp-*")), "a dead writer's temporary is cleaned up"
    run(omop_slice, tmp_path / "single", "omop")
    assert_same_output(tmp_path / "single", out)


def test_a_work_dir_of_other_settings_is_refused(omop_slice: Path, tmp_path: Path) -> None:
    run(omop_slice, tmp_path / "out", "omop", "task.shards=2", "task.stage=partition")
    run(omop_slice, tmp_path / "out", "omop", "task.shards=2", "task.shard=0")
    with pytest.raises(DataError, match=r"holds shards of other settings"):
        run(omop_slice, tmp_path / "out", "omop", "task.shards=2", "task.shard=1", "task.min_subjects=2")
    with pytest.raises(DataError, match=r"task.shard=2 is not one of the task.shards=2"):
        run(omop_slice, tmp_path / "out", "omop", "task.shards=2", "task.shard=2")
    with pytest.raises(DataError, match=r"task.shard .* needs task.shards"):
        run(omop_slice, tmp_path / "x", "omop", "task.shard=0")


def test_bad_input_fails_the_same_way_sharded(omop_slice: Path, tmp_path: Path) -> None:
    """The whole-data checks (no kept code, here) are made in the reduce, with the single pass's message."""
    messages = []
    for extra in ((), ("task.shards=3",)):
        with pytest.raises(CehrxError) as e:
            run(omop_slice, tmp_path / f"out{len(extra)}", "omop", "task.min_subjects=1000", *extra)
        messages.append(str(e.value))
    assert messages[0] == messages[1] and "lower it (task.min_subjects=" in messages[0]


FUZZ = (
    "null_person_ids",
    "duplicate_persons_and_visits",
    "duplicate_event_rows",
    "baseline_csv",
    "unparsable_dates_csv",
    "upper_case_names_csv",
    "empty_table_without_columns",
)


@pytest.mark.parametrize("case", [c for c in OMOP_CASES if c.name in FUZZ], ids=lambda c: c.name)
def test_dirty_input_sharded_is_the_single_pass(case, omop_slice: Path, tmp_path: Path) -> None:
    """Rows without a person id (shard 0 counts them), duplicate persons, visits and deaths, csv."""
    src = write_case(omop_slice, tmp_path / "src", case, tuple(p.stem for p in omop_slice.iterdir()))
    run(src, tmp_path / "single", "omop", *case.overrides)
    report = run(src, tmp_path / "sharded", "omop", "task.shards=5", *case.overrides)
    assert_same_output(tmp_path / "single", tmp_path / "sharded")
    assert_counts_balance(tmp_path / "sharded", report)
    if case.check:
        assert case.check(report)


# Bad input in csv files (a csv copy of each parquet case but those that damage a parquet file): the
# sharded prepare reads the csv tables in its `partition` job, and must fail with the single pass's error.
CSV_ERRORS = [
    c if c.fmt == "csv" else replace(c, name=c.name + "_csv", fmt="csv")
    for c in OMOP_CASES
    if c.error and not c.overrides and (c.fmt == "csv" or c.damage is None)
]


@pytest.mark.parametrize("case", CSV_ERRORS, ids=lambda c: c.name)
def test_bad_csv_fails_the_same_way_sharded(case, omop_slice: Path, tmp_path: Path) -> None:
    src = write_case(omop_slice, tmp_path / "src", case, tuple(p.stem for p in omop_slice.iterdir()))
    messages = []
    for extra in ((), ("task.shards=3",)):
        with pytest.raises(CehrxError) as e:
            run(src, tmp_path / f"out{len(extra)}", "omop", *extra)
        messages.append(str(e.value))
    assert messages[0] == messages[1]


@pytest.fixture(scope="module")
def synthea_csv(tmp_path_factory) -> tuple[Path, Path]:
    """Synthea 1k's csv tables, copied so that a test can empty them, and the single pass's output of them."""
    root = tmp_path_factory.mktemp("synthea_csv")
    shutil.copytree(shared_data("omop_synthea1k/csv"), root / "csv", copy_function=shutil.copyfile)
    run(root / "csv", root / "single", "synthea1k")
    return root / "csv", root / "single"


@pytest.mark.parametrize("shards", [1, 3, 7])
def test_csv_tables_are_read_once_for_all_shards(shards: int, synthea_csv, tmp_path: Path) -> None:
    """`task.stage=partition` reads each csv table once into per-shard parquet; the shard jobs read only
    those (the csv files are emptied before they run) and the output is the single pass's. A map job
    before the partition is refused: it would parse every csv file again."""
    src, single = synthea_csv
    out, n = tmp_path / "out", f"task.shards={shards}"
    with pytest.raises(DataError, match=r"is a folder of OMOP tables: .* task.stage=partition"):
        run(src, out, "synthea1k", n, "task.shard=0")
    assert run(src, out, "synthea1k", n, "task.stage=partition")["tables"]["measurement"] == "shards"
    saved = {f: f.read_bytes() for f in src.iterdir()}
    try:
        for f in saved:
            f.write_bytes(b"")
        report = run(src, out, "synthea1k", n, "task.stage=reduce")
    finally:
        for f, data in saved.items():
            f.write_bytes(data)
    assert_same_output(single, out)
    assert_counts_balance(out, report)


def test_shard_of_a_subject_is_the_same_in_sql_and_numpy() -> None:
    ids = np.array([0, 1, 2, 7, -3, 2**32, 2**40 + 5, 2**63 - 1, -(2**63), -(2**63) + 1, 123456789], dtype=np.int64)
    con = duckdb.connect()
    t = pa.table({"x": ids, "s": pa.array([str(i) for i in ids])})  # noqa: F841 (read by DuckDB)
    for n in (1, 2, 7, 256):
        got = [r[0] for r in con.execute(f"SELECT {shard_sql('x', n)} FROM t").fetchall()]
        assert got == shard_of(ids, n).tolist()
        text = [r[0] for r in con.execute(f"SELECT {shard_sql('s', n)} FROM t").fetchall()]
        assert text == got, "an id read as text goes where the integer goes"
    assert con.execute(f"SELECT {shard_sql('NULL', 8)}, {shard_sql(chr(39) + 'P12' + chr(39), 8)}").fetchall() == [
        (0, 0)
    ]
    counts = np.bincount(shard_of(np.arange(10_000), 16), minlength=16)
    assert counts.min() > 500, counts  # sequential ids spread evenly
    scaled = (np.arange(40)[:, None] * 10**6 + np.arange(2694)).ravel()  # experiments/bench/scale_omop.py's ids
    counts = np.bincount(shard_of(scaled, 256), minlength=256)
    assert counts.min() > 0.9 * counts.mean() and counts.max() < 1.1 * counts.mean(), counts


def test_shard_count_follows_data_size_and_budget() -> None:
    assert choose_shards(10**6, parse_bytes("4GB"), 16) == 1  # fits one budget: the single pass
    assert choose_shards(10**8, parse_bytes("4GB"), 1) == 10
    assert choose_shards(10**8, parse_bytes("4GB"), 16) == 16  # at least one shard per worker
    assert choose_shards(10**9, parse_bytes("4GB"), 16) == 100


def test_memory_budget_chooses_the_shards(omop_slice: Path, tmp_path: Path) -> None:
    """A budget the data exceeds shards it (here a tiny one: 60 persons' rows at 400 B a row)."""
    rows = prepare_jobs.source_rows(compose_cfg("task=prepare", "data=omop", f"data.path={omop_slice}"))
    report = run(omop_slice, tmp_path / "out", "omop", f"task.memory_budget={rows * 400 // 3}", "task.keep_work=true")
    plan = json.loads((tmp_path / ".out.shards" / "plan.json").read_text())
    assert plan["shards"] == 4 and report["subjects"]["in"] == 60
    assert os.path.isdir(tmp_path / ".out.shards" / "tokens" / "3")
