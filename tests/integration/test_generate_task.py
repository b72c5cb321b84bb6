"""`task=generate` end to end through the real Hydra configs, with a micro model trained a few steps."""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq
import pytest
from meds import CodeMetadataSchema, DataSchema

from cehrx.data.grammar import check_sequence
from cehrx.data.shards import SHARD_SCHEMA, load_split
from cehrx.data.vocab import Vocab
from cehrx.errors import CehrxError
from cehrx.generate.cdm import CDM_TABLES
from cehrx.tasks import generate
from tests.conftest import FIVE_STEPS_48, compose_cfg, make_prepared_dir, pretrain_micro

# a micro model decodes one token per step: one CPU thread is several times faster than many on a busy CI box
pytestmark = [pytest.mark.slow, pytest.mark.usefixtures("one_thread")]


@pytest.fixture(scope="module")
def trained(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    """(prepared dir, pretrain output dir): a micro model with a short context, trained 5 steps."""
    root = tmp_path_factory.mktemp("gen_task")
    prepared = make_prepared_dir(root / "prep", {"train": 24, "tuning": 6, "held_out": 2})
    return prepared, pretrain_micro(prepared, root / "model", *FIVE_STEPS_48)


def gen_cfg(prepared: Path, model: Path, out: Path | None, *overrides: str, budget: int | None = 36):
    """Generate 6 patients in shards of 4; output_dir None: the task's default (<model_dir>/../synthetic)."""
    budget_arg = [f"sampling.max_new_tokens={budget}"] if budget else []
    return compose_cfg(
        "task=generate",
        f"data.prepared_dir={prepared}",
        f"model_dir={model}",
        "generate.num_patients=6",
        "generate.shard_size=4",
        "sampling.batch_size=4",
        "generate.progress=false",
        "generate.duckdb.threads=1",
        "generate.threads=1",
        "generate.max_attempts_factor=10",
        *budget_arg,
        *([f"output_dir={out}"] if out else []),
        *overrides,
    )


def test_generate_end_to_end(trained: tuple[Path, Path]) -> None:
    prepared, model = trained
    cfg = gen_cfg(prepared, model, None, budget=None)
    out = Path(cfg.output_dir)
    assert out.resolve() == (model.parent / "synthetic").resolve()
    report = generate.run(cfg)

    p = report["patients"]
    assert p["generated"] == 6 and p["complete"] and p["samples"] == p["valid"] + sum(p["dropped"].values())
    assert report["tokens"]["per_second"] > 0 and report["settings"]["sampling"]["max_new_tokens"] == 44
    assert json.loads((out / "generate.json").read_text())["patients"]["generated"] == 6
    assert not any(out.parent.glob(".synthetic.*")), "no partial or temporary dirs left behind"

    # tokens: a prepared-dir view of the patients, every sequence valid
    vocab = Vocab.load(out)
    assert vocab.tokens == Vocab.load(prepared).tokens
    assert pq.read_schema(next((out / "tokens" / "train").glob("*.parquet"))) == SHARD_SCHEMA
    arrays = load_split(out, "train")
    assert len(arrays) == 6 and len(set(arrays.subject_id.tolist())) == 6
    assert all(check_sequence(vocab, arrays.subject(i)[0]) is None for i in range(len(arrays)))
    assert (np.diff(arrays.times)[np.diff(np.repeat(np.arange(6), arrays.lengths())) == 0] >= 0).all()

    # MEDS and OMOP
    for f in (out / "meds" / "data").rglob("*.parquet"):
        DataSchema.validate(pq.read_schema(f))
    CodeMetadataSchema.validate(pq.read_table(out / "meds" / "metadata" / "codes.parquet"))
    for table, cols in CDM_TABLES.items():
        assert pq.read_schema(out / "omop" / f"{table}.parquet").names == [c for c, _ in cols]
    assert pq.read_metadata(out / "omop" / "person.parquet").num_rows == 6
    assert report["outputs"]["omop_rows"]["visit_occurrence"] == int((arrays.tokens == vocab["[VS]"]).sum())

    with pytest.raises(CehrxError, match="overwrite=true"):
        generate.run(cfg)


def test_patients_longer_than_the_context_continue_in_windows(trained: tuple[Path, Path], tmp_path: Path) -> None:
    prepared, model = trained
    report = generate.run(gen_cfg(prepared, model, tmp_path / "long", "generate.max_total_tokens=160", budget=None))
    assert report["settings"]["max_total_tokens"] == 160 and report["patients"]["generated"] == 6
    vocab, arrays = Vocab.load(tmp_path / "long"), load_split(tmp_path / "long", "train")
    assert arrays.lengths().max() > 48, "some patient runs past the 48-token context"
    assert (arrays.lengths() <= 160 + 4).all()
    assert all(check_sequence(vocab, arrays.subject(i)[0]) is None for i in range(len(arrays)))
    assert (np.diff(arrays.times)[np.diff(np.repeat(np.arange(len(arrays)), arrays.lengths())) == 0] >= 0).all()


def test_interrupted_run_resumes_to_the_same_patients(
    trained: tuple[Path, Path], tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    prepared, model = trained
    real = generate.generate_shard
    calls = []

    def crash_on_second(*args, **kwargs):
        calls.append(1)
        if len(calls) == 2:
            raise KeyboardInterrupt("simulated crash")
        return real(*args, **kwargs)

    monkeypatch.setattr(generate, "generate_shard", crash_on_second)
    with pytest.raises(KeyboardInterrupt):
        generate.run(gen_cfg(prepared, model, tmp_path / "a"))
    assert not (tmp_path / "a").exists() and (tmp_path / ".a.partial" / "shard_stats" / "0.json").is_file()
    monkeypatch.setattr(generate, "generate_shard", real)
    with pytest.raises(CehrxError, match="other settings"):
        generate.run(gen_cfg(prepared, model, tmp_path / "a", "sampling.temperature=0.5"))
    with pytest.raises(CehrxError, match="other settings: drop_train_copies"):
        generate.run(gen_cfg(prepared, model, tmp_path / "a", "generate.drop_train_copies=false"))
    resumed = generate.run(gen_cfg(prepared, model, tmp_path / "a"))
    assert resumed["resumed_shards"] == 1 and resumed["patients"]["generated"] == 6

    fresh = generate.run(gen_cfg(prepared, model, tmp_path / "b"))
    assert fresh["resumed_shards"] == 0
    a, b = load_split(tmp_path / "a", "train"), load_split(tmp_path / "b", "train")
    np.testing.assert_array_equal(a.tokens, b.tokens)
    np.testing.assert_array_equal(a.times, b.times)
    np.testing.assert_array_equal(a.subject_id, b.subject_id)


def test_copies_of_train_records_are_dropped_and_sampled_again(
    trained: tuple[Path, Path], tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The sampler's first sample of every shard is made a train record verbatim (its prompt, its body, [END]):
    with `generate.drop_train_copies` (default) it is dropped as `copy_of_train`, sampling refills the shard and
    evaluate's exact-copy rate of the output is 0; with the option off the copy is written (today's behaviour)."""
    from cehrx.eval.privacy import exact_copy_rate
    from cehrx.tasks.evaluate import MODEL_SET, _load_sets

    prepared, model = trained
    vocab, train = Vocab.load(prepared), load_split(prepared, "train")
    row = int(np.argmin(train.lengths()))
    record = train.subject(row)[0]
    body = np.append(record[4:], vocab["[END]"]).astype(np.int32)
    real = generate.sample_windows

    def planting(*args, **kwargs):
        s = real(*args, **kwargs)
        gen = [body, *(s.sequence(i) for i in range(1, len(s)))]
        offsets = np.concatenate([[0], np.cumsum([len(g) for g in gen])]).astype(np.int64)
        return dataclasses.replace(s, tokens=np.concatenate(gen).astype(np.int32), offsets=offsets)

    monkeypatch.setattr(generate, "sample_windows", planting)
    prompt = ",".join(vocab.tokens[t] for t in record[:4])  # every sample continues the record's prompt
    copy_rate = {}
    for on in (True, False):
        out = tmp_path / f"drop_{on}"
        report = generate.run(
            gen_cfg(prepared, model, out, f"generate.prompts=[[{prompt}]]", f"generate.drop_train_copies={on}")
        )
        p = report["patients"]
        assert p["generated"] == 6 and p["complete"] and p["samples"] == p["valid"] + sum(p["dropped"].values())
        assert report["settings"]["drop_train_copies"] is on
        assert p["dropped"]["copy_of_train"] == (report["shards"] if on else 0)
        saved = json.loads((out / "generate.json").read_text())["patients"]["dropped"]["copy_of_train"]
        assert saved == p["dropped"]["copy_of_train"]
        e = compose_cfg("task=evaluate", f"data.prepared_dir={prepared}", f"synthetic_dir={out}").evaluate
        real_train, _, sets, _ = _load_sets(e, prepared, {MODEL_SET: out})  # as evaluate loads them
        copy_rate[on] = exact_copy_rate(real_train, sets[MODEL_SET])
    assert copy_rate[True] == 0.0 and copy_rate[False] > 0.0


def test_explicit_prompts_and_clear_errors(trained: tuple[Path, Path], tmp_path: Path) -> None:
    prepared, model = trained
    report = generate.run(
        gen_cfg(
            prepared,
            model,
            tmp_path / "p",
            "generate.num_patients=3",
            "generate.prompts=[[YEAR//2000,AGE//40,GENDER//F,RACE//1]]",
        )
    )
    arrays = load_split(tmp_path / "p", "train")
    vocab = Vocab.load(tmp_path / "p")
    assert report["prompts"]["source"] == "config"
    assert {vocab.tokens[t] for t in arrays.tokens[arrays.offsets[:-1] + 1]} == {"AGE//40"}
    with pytest.raises(CehrxError, match="max_seq_len=48"):
        generate.run(gen_cfg(prepared, model, tmp_path / "q", "sampling.max_new_tokens=100"))
    with pytest.raises(CehrxError, match="not in the model's vocabulary"):
        generate.run(
            gen_cfg(prepared, model, tmp_path / "r", "generate.prompts=[[YEAR//1066,AGE//40,GENDER//F,RACE//1]]")
        )


def test_prepared_dir_of_another_data_set_falls_back_to_the_models(trained: tuple[Path, Path], tmp_path: Path) -> None:
    """`data.prepared_dir` defaults to runs/<data.name>: when that is some other prepared dir, use the model's own."""
    prepared, model = trained
    other = make_prepared_dir(tmp_path / "other", {"train": 4, "tuning": 1, "held_out": 1})
    v = Vocab.load(other)  # one more code: a different vocabulary
    Vocab(
        v.tokens + ["SNOMED/999999"], v.kinds + ["code"], v.counts + [1], v.subjects + [1], v.descriptions + [None]
    ).save(other / "vocab.json")
    cfg = gen_cfg(prepared, model, tmp_path / "o", "generate.num_patients=1")
    cfg.data.prepared_dir = str(other)
    report = generate.run(cfg)
    assert Path(report["settings"]["prepared_dir"]) == prepared.resolve()


def test_a_finished_output_drops_its_leftover_partial_dir(tmp_path: Path) -> None:
    """A kill between putting the output in place and removing `.<name>.partial` left the partial dir for
    good (every later run is refused before cleaning): the next run removes it, then refuses as before."""
    from cehrx.tasks.generate import run

    out = tmp_path / "synthetic"
    out.mkdir()
    (out / "generate.json").write_text("{}\n")
    partial = tmp_path / ".synthetic.partial"
    (partial / "tokens" / "train").mkdir(parents=True)
    with pytest.raises(CehrxError, match="overwrite=true"):
        run(compose_cfg("task=generate", f"output_dir={out}"))
    assert not partial.exists() and (out / "generate.json").is_file()
