"""Shared fixtures: compose the real Hydra configs with tiny overrides, and locate ../shared/data."""

from __future__ import annotations

from pathlib import Path

import pytest
from hydra import compose, initialize_config_dir
from omegaconf import DictConfig

from cehrx.configs import config_dir

REPO = Path(__file__).resolve().parent.parent
SHARED_DATA = REPO.parent / "shared" / "data"


def compose_cfg(*overrides: str) -> DictConfig:
    """The config `cehrx <overrides>` would run with."""
    with initialize_config_dir(config_dir=config_dir(), version_base="1.3"):
        return compose("config", overrides=list(overrides))


# Overrides that keep a test's Lightning run quiet, and without logs or callbacks.
QUIET = ("trainer.enable_progress_bar=false", "trainer.enable_model_summary=false", "trainer.num_sanity_val_steps=0")
NO_LOGS = ("logger=none", "callbacks=none")
# a micro model with a 48-token context, trained 5 steps (generate and evaluate tests)
FIVE_STEPS_48 = (
    "model.max_seq_len=48",
    "task.datamodule.max_tokens_per_batch=256",
    "trainer.max_steps=5",
    "trainer.val_check_interval=5",
)


def pretrain_micro(prepared: Path, out: Path, *overrides: str) -> Path:
    """`out`: the micro model pretrained on CPU on `prepared` with `overrides` (quietly, no logs)."""
    from cehrx.tasks import pretrain

    base = ("task=pretrain", "model=micro", "trainer=cpu", f"data.prepared_dir={prepared}", f"output_dir={out}")
    pretrain.run(compose_cfg(*base, *overrides, *QUIET, *NO_LOGS))
    return out


@pytest.fixture(scope="module")
def one_thread():
    """One torch thread for a module's tests (restored after): a micro model's steps are tiny, so on a
    loaded CPU box more threads only spin, and the arithmetic is that of subprocesses run with
    OMP_NUM_THREADS=1. Use with `pytestmark = pytest.mark.usefixtures("one_thread")`."""
    import torch

    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


def shared_data(name: str) -> Path:
    """A public data set from ../shared/data, or skip with the reason (a user's fresh clone lacks it)."""
    path = SHARED_DATA / name
    if not path.exists():
        pytest.skip(f"{path} not found: the shared public data sets are only beside the project in CI/dev")
    return path


# --------------------------------------------------------------------------------------------
# A tiny synthetic prepared dir (pretrain tests): real vocab.json + token shards contracts.


def make_prepared_dir(root: Path, n_subjects: dict[str, int] | None = None, seed: int = 0) -> Path:
    """Write `root/vocab.json` and `root/tokens/<split>/*.parquet` following DESIGN §4.

    Subjects get 1-12 visits of 1-8 codes (some inpatient with i-D tokens), gap tokens between
    visits, sometimes [DEATH]; lengths range from ~10 to ~150 tokens so small `max_seq_len`
    values force visit-aligned crops. Times are real seconds, non-decreasing per subject.
    """
    import numpy as np
    import pyarrow as pa
    import pyarrow.parquet as pq

    from cehrx.data.shards import SHARD_SCHEMA
    from cehrx.data.vocab import SPECIAL_TOKENS, Vocab, kind_of

    n_subjects = n_subjects or {"train": 48, "tuning": 12, "held_out": 6}
    tokens = list(SPECIAL_TOKENS)
    tokens += [f"YEAR//{y}" for y in range(1900, 2101)] + ["YEAR//UNKNOWN"]
    tokens += [f"AGE//{a}" for a in range(0, 111)] + ["AGE//UNKNOWN"]
    tokens += ["GENDER//F", "GENDER//M", "GENDER//UNKNOWN", "RACE//1", "RACE//2", "RACE//UNKNOWN"]
    tokens += ["VISIT//OP", "VISIT//IP"]
    tokens += [f"D{n}" for n in range(0, 400)] + [f"Y{n}" for n in range(3, 8)]
    tokens += [f"i-D{n}" for n in range(1, 5)] + [f"Q{k}" for k in range(1, 11)]
    tokens += [f"SNOMED/{c}" for c in range(100, 140)]
    vocab = Vocab(tokens, [kind_of(t) for t in tokens], [1] * len(tokens), [1] * len(tokens), [None] * len(tokens))
    root.mkdir(parents=True, exist_ok=True)
    vocab.save(root / "vocab.json")
    rng = np.random.default_rng(seed)
    day = 86400
    sid = 1
    for split, n in n_subjects.items():
        rows = []
        for _ in range(n):
            birth = int(rng.integers(-30 * 365, 40 * 365)) * day
            t = birth + int(rng.integers(1 * 365, 50 * 365)) * day
            year = 1970 + int(t // (365.25 * day))
            age = int((t - birth) // (365.25 * day))
            toks = [
                f"YEAR//{year}",
                f"AGE//{age}",
                str(rng.choice(["GENDER//F", "GENDER//M"])),
                str(rng.choice(["RACE//1", "RACE//2"])),
            ]
            times = [t] * 4
            for v in range(int(rng.integers(1, 13))):
                if v:
                    gap = int(rng.integers(0, 400)) if rng.random() < 0.9 else int(rng.integers(3, 8)) * 365
                    t += gap * day
                    toks.append(f"D{gap}" if gap < 400 else f"Y{gap // 365}")
                    times.append(t)
                inpatient = rng.random() < 0.2
                toks += ["[VS]", "VISIT//IP" if inpatient else "VISIT//OP"]
                times += [t, t]
                for c in range(int(rng.integers(1, 9))):
                    if inpatient and c == 3:
                        t += day
                        toks.append("i-D1")
                        times.append(t)
                    toks.append(f"SNOMED/{int(rng.integers(100, 140))}")
                    times.append(t)
                    if rng.random() < 0.2:
                        toks.append(f"Q{int(rng.integers(1, 11))}")
                        times.append(t)
                toks.append("[VE]")
                times.append(t)
            if rng.random() < 0.1:
                t += 30 * day
                toks += ["D30", "[DEATH]"]
                times += [t, t]
            ids = [vocab[x] for x in toks]
            rows.append({"subject_id": sid, "tokens": ids, "times": times, "birth_time": birth, "n_tokens": len(ids)})
            sid += 1
        d = root / "tokens" / split
        d.mkdir(parents=True, exist_ok=True)
        half = max(len(rows) // 2, 1)
        for i, chunk in enumerate([rows[:half], rows[half:]]):
            if chunk or i == 0:
                pq.write_table(pa.Table.from_pylist(chunk, schema=SHARD_SCHEMA), d / f"{i}.parquet")
    (root / "prepare.json").write_text("{}\n")
    return root


@pytest.fixture(scope="session")
def synthetic_prepared(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A session-wide synthetic prepared dir (read-only for tests: copy it to modify)."""
    return make_prepared_dir(tmp_path_factory.mktemp("prepared") / "synth")


# --------------------------------------------------------------------------------------------
# prepare.json accounting, checked on every public set and every fuzzed input.


def assert_counts_balance(out: Path, report: dict) -> None:
    """A finished prepare output is not empty and accounts for everything it read (README, prepare.json).

    Subjects in = tokenized + dropped by reason; MEDS events in = code tokens + `not_code_tokens` by
    reason; per source table, rows in = rows kept + rows dropped by reason. The tokenized counts are
    checked against the shards themselves (subjects, and tokens of kind `code`).
    """
    import json

    import numpy as np

    from cehrx.data.shards import SPLITS, load_split
    from cehrx.data.vocab import KINDS, Vocab

    assert report == json.loads((out / "prepare.json").read_text())
    s, e = report["subjects"], report["events"]
    assert s["tokenized"] > 0 and e["tokenized"] > 0, "a finished output holds subjects and clinical events"
    assert s["in"] == s["tokenized"] + sum(s["dropped"].values()), s
    assert e["in"] == e["tokenized"] + sum(e["not_code_tokens"].values()), e
    for table, n in e["rows_in_by_table"].items():
        assert n == e["rows_kept_by_table"][table] + sum(e["dropped"].get(table, {}).values()), (table, e)
    vocab = Vocab.load(out)
    code = np.flatnonzero(vocab.kind_array() == KINDS.index("code"))
    splits = [load_split(out, split) for split in SPLITS]
    assert sum(len(a) for a in splits) == s["tokenized"]
    assert sum(int(np.isin(a.tokens, code).sum()) for a in splits) == e["tokenized"]
