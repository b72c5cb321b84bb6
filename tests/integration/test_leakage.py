"""No future reaches a prediction, through whole tasks (issue #23).

A MEDS data set is prepared twice, as is and with visits and events planted after every label's prediction
time; `probe`, `finetune` and `zeroshot` on the same model and labels must then give identical features,
weights and predictions. Also: OMOP date-only and midnight events sit at 23:59:59 of their day, so a prediction that
day cannot see them; and cross-fitted probing says which scores rest on pretraining subjects and keeps
them out of `predictions.parquet`.

The model is a random-init micro model exported with the data's vocabulary: identical inputs give
identical outputs whatever the weights, and random weights react to every token.
"""

from __future__ import annotations

import datetime as dt
import importlib
import json
import shutil
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch

from cehrx.data.history import cut_histories, load_all_splits
from cehrx.data.vocab import Vocab
from cehrx.eval.predictions import read_predictions
from cehrx.probe.labels import times_seconds
from tests.conftest import compose_cfg
from tests.integration.test_probe_task import BLEED, NSAID, RISK, write_meds_fixture

pytestmark = [pytest.mark.slow, pytest.mark.xdist_group("leakage")]  # one module fixture, one worker

TASK = "gibleed_after_nsaid"
PROBE = ("probe.n_boot=20", "probe.few_shot=[]", "probe.progress=false", "probe.min_code_labels=2")


def add_events(src: Path, dst: Path, rows: list[tuple[int, dt.datetime, str]]) -> Path:
    """A copy of the MEDS data set `src` with `rows` (subject, time, code) added."""
    shutil.copytree(src, dst)
    path = dst / "data" / "train" / "0.parquet"
    table = pq.read_table(path)
    extra = pa.table(
        {
            "subject_id": pa.array([r[0] for r in rows], pa.int64()),
            "time": pa.array([r[1] for r in rows], pa.timestamp("us")),
            "code": pa.array([r[2] for r in rows], pa.string()),
            "numeric_value": pa.array([None] * len(rows), pa.float32()),
        }
    )
    pq.write_table(pa.concat_tables([table, extra]).sort_by([("subject_id", "ascending"), ("time", "ascending")]), path)
    return dst


def prepare(meds: Path, out: Path) -> Path:
    from cehrx.tasks.prepare import run

    run(
        compose_cfg(
            "task=prepare",
            "data=meds",
            f"data.path={meds}",
            f"output_dir={out}",
            "task.min_subjects=2",
            "task.duckdb.threads=1",
        )
    )
    return out


class Planted:
    def __init__(self, root: Path) -> None:
        from cehrx.probe.labels import extract_labels

        self.root = root
        self.meds = write_meds_fixture(root / "meds")
        self.labels_table = extract_labels(TASK, self.meds)
        self.labels = root / "labels"
        self.labels.mkdir()
        pq.write_table(self.labels_table, self.labels / "0.parquet")
        self.prepared = prepare(self.meds, root / "prepared")
        self.model = export_random_model(self.prepared, root / "model")

    def label_times(self) -> list[tuple[int, dt.datetime]]:
        t = self.labels_table
        return list(zip(t.column("subject_id").to_pylist(), t.column("prediction_time").to_pylist(), strict=True))


def export_random_model(prepared: Path, out: Path) -> Path:
    """A micro model with fresh weights and the prepared dir's vocabulary, exported as pretrain would."""
    from hydra.utils import instantiate

    from cehrx.model.export import export_model
    from cehrx.model.transformer import GPT

    cfg = compose_cfg("task=pretrain", "model=micro", "model.max_seq_len=128")
    config = instantiate(cfg.model, vocab_size=len(Vocab.load(prepared)), _convert_="all")
    torch.manual_seed(0)
    export_model(
        GPT(config).state_dict(),
        config,
        prepared / "vocab.json",
        out / "model",
        {"data": {"prepared_dir": str(prepared)}},
    )
    return out


@pytest.fixture(scope="module")
def world(tmp_path_factory: pytest.TempPathFactory) -> Planted:
    return Planted(tmp_path_factory.mktemp("leakage"))


@pytest.fixture(scope="module")
def with_future(world: Planted) -> Path:
    """The same data plus, after every label's prediction time, new visits on later days: the NSAID again,
    the outcome, the risk code, a lab, a midnight event; and the outcome again 40 days on."""
    rows = []
    for s, t in world.label_times():
        next_day = t + dt.timedelta(days=1, hours=2)
        rows += [(s, next_day, c) for c in (NSAID, BLEED, RISK, "LOINC/2")]
        rows.append((s, dt.datetime.combine((t + dt.timedelta(days=3)).date(), dt.time()), "LOINC/3"))
        rows.append((s, t + dt.timedelta(days=40), BLEED))
    meds = add_events(world.meds, world.root / "meds_future", rows)
    out = prepare(meds, world.root / "prepared_future")
    assert Vocab.load(out).tokens == Vocab.load(world.prepared).tokens, "the planted codes are all in the vocabulary"
    a, _ = load_all_splits(world.prepared)
    b, _ = load_all_splits(out)
    assert len(b.tokens) > len(a.tokens) + 5 * len(rows) // 6, "the planted events are in the token shards"
    return out


def same_tables(a: Path, b: Path) -> None:
    ta, tb = pq.read_table(a), pq.read_table(b)
    assert ta.column_names == tb.column_names and ta.num_rows == tb.num_rows > 0
    for name in ta.column_names:
        x, y = ta.column(name).to_pylist(), tb.column(name).to_pylist()
        assert json.dumps(x, default=str) == json.dumps(y, default=str), f"{a.name}: column {name} differs"


def run_on_both(world: Planted, with_future: Path, task: str, *overrides: str) -> tuple[dict, Path, Path]:
    """`task` on the data as is and with the future planted (same model, labels and overrides): the two
    results (by name) and the two output dirs."""
    run = importlib.import_module(f"cehrx.tasks.{task}").run
    results = {}
    for name, prepared in (("as_is", world.prepared), ("future", with_future)):
        results[name] = run(
            compose_cfg(
                f"task={task}",
                f"model_dir={world.model}",
                f"data.prepared_dir={prepared}",
                f"labels_dir={world.labels}",
                f"output_dir={world.root / task / name}",
                *overrides,
            )
        )
    return results, world.root / task / "as_is", world.root / task / "future"


def test_future_visits_change_no_probe_feature_or_prediction(world: Planted, with_future: Path) -> None:
    results, a, b = run_on_both(world, with_future, "probe", "probe.baselines=[counts,counts_window]", *PROBE)
    for name, prepared in (("as_is", world.prepared), ("future", with_future)):
        assert results[name]["prepared_dir"] == str(prepared), "each run read its own prepared dir"
    same_tables(a / "features.parquet", b / "features.parquet")
    for method in ("probe", "counts", "counts_window"):
        same_tables(a / "predictions" / f"{method}.parquet", b / "predictions" / f"{method}.parquet")
    assert results["as_is"]["labels"] == results["future"]["labels"]
    assert json.dumps(results["as_is"]["methods"]) == json.dumps(results["future"]["methods"])


def test_future_visits_change_no_zeroshot_prediction(world: Planted, with_future: Path) -> None:
    sampling = "sampling" if "sampling" in compose_cfg("task=zeroshot") else "zeroshot"
    _, a, b = run_on_both(
        world,
        with_future,
        "zeroshot",
        f"probe.task={TASK}",
        "split=all",
        "zeroshot.num_samples=2",
        f"{sampling}.max_new_tokens=24",
        "zeroshot.n_boot=20",
        "zeroshot.progress=false",
    )
    same_tables(a / "details.parquet", b / "details.parquet")  # both estimators, per label
    same_tables(a / "predictions.parquet", b / "predictions.parquet")
    hazard = pq.read_table(a / "details.parquet").column("hazard_probability").to_numpy()
    assert len(np.unique(hazard)) > 10, "the predictions depend on the histories"


def test_future_visits_change_no_finetune_prediction(world: Planted, with_future: Path) -> None:
    """Fine-tuning trains on the histories it scores: with the future planted, the same seed must train
    the same weights and give the same predictions (any leak reaches the loss, the weights and the scores).
    Backbone lr 1e-5: this random-init model's readout barely varies (sd 0.05-0.16), so the probe's head
    that fine-tuning starts from has large weights, and at the default 1e-4 two epochs saturate every score."""
    results, a, b = run_on_both(
        world,
        with_future,
        "finetune",
        f"probe.task={TASK}",
        "probe.progress=false",
        "probe.min_code_labels=2",
        "finetune.epochs=2",
        "finetune.lr=1e-5",
        "finetune.n_boot=20",
        "finetune.progress=false",
        "finetune.batch_tokens=2048",
    )
    same_tables(a / "predictions.parquet", b / "predictions.parquet")
    p = pq.read_table(a / "predictions.parquet").column("predicted_boolean_probability").to_numpy()
    assert len(np.unique(p)) > 10, "the predictions depend on the histories"
    ra, rb = results["as_is"]["budgets"], results["future"]["budgets"]
    for r in (ra, rb):
        r["all"]["finetune"].pop("seconds")  # wall time: the one field that may differ
    assert json.dumps(ra, sort_keys=True, default=str) == json.dumps(rb, sort_keys=True, default=str)


def test_later_events_on_the_prediction_day_change_no_history(world: Planted) -> None:
    """Events added later on the prediction's own day, between the prediction time and 23:59:59, change no
    history: a day visit (events with no visit) ends at 23:59:59 of its day, not at its last event, so its
    `[VE]` at a prediction time inside that day never says whether more events follow that day."""
    later = {s: t + (dt.datetime.combine(t.date(), dt.time(23, 59, 59)) - t) / 2 for s, t in world.label_times()}
    rows = [(s, t, "LOINC/2") for s, t in later.items()]  # halfway to the end of the prediction's day
    same_day = prepare(add_events(world.meds, world.root / "meds_same_day", rows), world.root / "prepared_same_day")
    vocab = Vocab.load(world.prepared)
    sid = world.labels_table.column("subject_id").to_numpy()
    t = times_seconds(world.labels_table.column("prediction_time"))
    a = cut_histories(load_all_splits(world.prepared)[0], vocab, sid, t, max_len=10_000)
    b = cut_histories(load_all_splits(same_day)[0], vocab, sid, t, max_len=10_000)
    assert np.array_equal(a.offsets, b.offsets) and np.array_equal(a.tokens, b.tokens)


def test_cross_fitted_probe_keeps_pretraining_subjects_out_of_predictions(world: Planted) -> None:
    """split=held_out scored by cross-fitting (too few held-out labels, or probe.evaluation=cv): the metrics over
    every label say how many are pretraining subjects, the held-out labels are scored alone, and the
    predictions file (what MEDS-DEV scores) holds only them."""
    from cehrx.tasks.probe import run

    out = world.root / "probe_cv"
    result = run(
        compose_cfg(
            "task=probe",
            f"model_dir={world.model}",
            f"labels_dir={world.labels}",
            f"output_dir={out}",
            "probe.evaluation=cv",
            "probe.baselines=[counts]",
            *PROBE,
        )
    )
    held = result["labels"]["by_split"]["held_out"]
    scored = result["scored"]
    assert result["evaluation"].startswith("cv") and result["split"] == scored["split"] == "held_out"
    assert (
        scored["labels"] == result["labels"]["used"] and scored["pretraining_labels"] == scored["by_split"]["train"] > 0
    )
    assert result["warnings"] and "pretrained on" in result["warnings"][0]
    only = result["split_only"]
    assert only["split"] == "held_out" and only["labels"] == held["n"] and only["positives"] == held["n_pos"]
    assert set(only["methods"]) == {"probe", "counts"} and only["methods"]["probe"]["n"] == held["n"]
    labels = pq.read_table(out / "labels.parquet")
    held_ids = set(np.asarray(labels.column("subject_id"))[np.asarray(labels.column("split")) == "held_out"].tolist())
    preds = read_predictions(out / "predictions.parquet")
    assert preds.num_rows == held["n"] and set(preds.column("subject_id").to_pylist()) <= held_ids
    assert pq.read_metadata(out / "predictions" / "probe.parquet").num_rows == scored["labels"]  # as the metrics
    assert "held_out labels alone" in (out / "report.md").read_text()
    saved = json.loads((out / "metrics.json").read_text())
    assert saved["warnings"] == result["warnings"] and saved["split_only"]["labels"] == held["n"]


# OMOP: a DATE (condition) and a datetime at exactly midnight (drug) on 2020-03-10 sit at 23:59:59 that day;
# a measurement at 10:00 keeps its time.
OMOP = {
    "person": "person_id,gender_concept_id,year_of_birth\n" + "\n".join(f"{i},8532,1970" for i in range(1, 13)),
    "condition_occurrence": "person_id,condition_concept_id,condition_start_date\n"
    + "\n".join(f"{i},320128,2020-01-05\n{i},201826,2020-03-10" for i in range(1, 13)),
    "drug_exposure": "person_id,drug_concept_id,drug_exposure_start_date,drug_exposure_start_datetime\n"
    + "\n".join(f"{i},1124300,2020-03-10,2020-03-10 00:00:00" for i in range(1, 13)),
    "measurement": "person_id,measurement_concept_id,measurement_date,measurement_datetime\n"
    + "\n".join(f"{i},3004249,2020-03-10,2020-03-10 10:00:00" for i in range(1, 13)),
}


def test_date_only_and_midnight_omop_events_are_unseen_the_same_day(tmp_path: Path) -> None:
    from cehrx.tasks.prepare import run

    src = tmp_path / "omop"
    src.mkdir()
    for name, body in OMOP.items():
        (src / f"{name}.csv").write_text(body + "\n")
    out = tmp_path / "prepared"
    run(compose_cfg("task=prepare", "data=omop", f"data.path={src}", f"output_dir={out}", "task.min_subjects=1"))
    vocab = Vocab.load(out)
    arrays, _ = load_all_splits(out)
    day = int(dt.datetime(2020, 3, 10, tzinfo=dt.timezone.utc).timestamp())

    def seen(at: int) -> set[str]:
        h = cut_histories(arrays, vocab, arrays.subject_id, np.full(len(arrays.subject_id), at), max_len=10_000)
        return {vocab.tokens[i] for i in h.tokens}

    codes = {"condition": "OMOP_CONCEPT_ID/201826", "drug": "OMOP_CONCEPT_ID/1124300", "lab": "OMOP_CONCEPT_ID/3004249"}
    assert set(codes.values()) <= set(vocab.tokens)
    noon, last_second = seen(day + 12 * 3600), seen(day + 86399)
    assert codes["lab"] in noon and codes["condition"] not in noon and codes["drug"] not in noon
    assert set(codes.values()) <= last_second
    assert "OMOP_CONCEPT_ID/320128" in seen(day)  # earlier days are known
