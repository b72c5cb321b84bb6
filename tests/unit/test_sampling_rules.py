"""The sampling engine's rules: grammar constraints, stops and budgets, the context limit, row order, errors."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch

from cehrx.data.decode import token_seconds
from cehrx.data.grammar import check_sequence
from cehrx.data.shards import load_split
from cehrx.data.vocab import Vocab
from cehrx.errors import CehrxError
from cehrx.model.config import GPTConfig
from cehrx.model.transformer import GPT
from cehrx.sampling import STOP_DEATH, STOP_END, STOP_TIME, STOP_TOKENS, SamplingConfig
from cehrx.sampling.constraints import Grammar

# the fixtures and helpers of the engine tests, shared
from tests.unit.test_sampling import ENDS_OPEN, full_sequences, histories, micro, sample, vocab  # noqa: E402,F401

pytestmark = pytest.mark.usefixtures("one_thread")  # as in test_sampling: a second torch thread only spins


def test_constrained_samples_always_follow_the_grammar(vocab: Vocab, histories: tuple[np.ndarray, np.ndarray]) -> None:
    """Many samples from a random model, prompts ending anywhere: every sample that stopped at
    [END]/[DEATH] is a valid sequence, every budget-stopped one a valid prefix. Unconstrained
    sampling from the same model breaks the grammar (so the check can fail)."""
    toks, offs = histories
    model = micro(vocab)
    cfg = SamplingConfig(max_new_tokens=80, batch_size=64, seed=0)
    s = sample(model, vocab, toks, offs, cfg, num_samples=4, progress=False)
    inpatient = Grammar.build(vocab).inpatient_types
    assert (np.isin(s.stop, [STOP_END, STOP_DEATH])).sum() > 20 and (s.stop == STOP_TOKENS).sum() > 5
    for seq, stop in zip(full_sequences(s, toks, offs), s.stop):
        err = check_sequence(vocab, seq, inpatient)
        if stop in (STOP_END, STOP_DEATH):
            assert err is None, err
        else:
            assert err is None or err.startswith(ENDS_OPEN), err
    free = sample(
        model,
        vocab,
        toks,
        offs,
        SamplingConfig(**{**cfg.to_dict(), "constrained": False}),
        num_samples=1,
        progress=False,
    )
    errors = [check_sequence(vocab, q, inpatient) for q in full_sequences(free, toks, offs)]
    assert sum(e is not None and not e.startswith(ENDS_OPEN) for e in errors) > len(errors) // 2


def test_grammar_machine_agrees_with_check_sequence(vocab: Vocab, synthetic_prepared: Path) -> None:
    """Real sequences end in a between-visits or dead state; one corrupted token sends the
    machine to FREE exactly when check_sequence rejects the sequence."""
    arr = load_split(synthetic_prepared, "train")
    g = Grammar.build(vocab)
    states = g.prompt_states(arr.tokens, arr.offsets)
    assert {g.state_name(s) for s in states} <= {"between", "dead"}
    rng = np.random.default_rng(0)
    toks = arr.tokens.astype(np.int64).copy()
    where = arr.offsets[:-1] + rng.integers(4, arr.lengths())
    toks[where] = rng.integers(0, len(vocab), len(where))
    states = g.prompt_states(toks, arr.offsets)
    for i in range(len(arr)):
        seq = toks[arr.offsets[i] : arr.offsets[i + 1]]
        err = check_sequence(vocab, seq, g.inpatient_types)
        rejected = err is not None and not err.startswith(ENDS_OPEN)
        assert bool(g.is_free(states[i])) == rejected, (err, g.state_name(states[i]))


def test_inpatient_time_only_inside_inpatient_visits(vocab: Vocab) -> None:
    g = Grammar.build(vocab, inpatient_types={"IP"})
    itime = torch.tensor([k == "inpatient_time" for k in vocab.kinds])
    prompt = [vocab[t] for t in ("YEAR//2000", "AGE//40", "GENDER//F", "RACE//1", "[VS]")]
    for visit, expect in (("VISIT//IP", True), ("VISIT//OP", False)):
        st = g.prompt_states(np.array(prompt + [vocab[visit]]), np.array([0, len(prompt) + 1]))
        allowed = g.allowed[torch.from_numpy(st)][0]
        assert bool(allowed[itime].all()) is expect and not bool(allowed[vocab["[VS]"]])
        assert bool(allowed[vocab["[VE]"]]) and not bool(allowed[vocab["D3"]])


def test_token_and_time_budgets(vocab: Vocab, histories: tuple[np.ndarray, np.ndarray]) -> None:
    toks, offs = histories
    model = micro(vocab)
    secs = token_seconds(vocab)
    s = sample(
        model,
        vocab,
        toks,
        offs,
        SamplingConfig(max_new_tokens=30, max_days=100.0, batch_size=32),
        num_samples=2,
        progress=False,
    )
    lens = s.lengths()
    assert lens.max() <= 30 and (lens[s.stop == STOP_TOKENS] == 30).all()
    assert {STOP_TIME, STOP_TOKENS} <= set(s.stop.tolist())
    for i in range(len(s)):
        days = np.cumsum(secs[s.sequence(i)]) / 86400.0
        assert s.elapsed_days[i] == pytest.approx(days[-1])
        if s.stop[i] == STOP_TIME:  # the crossing time token is the last one, and only it is past the budget
            assert days[-1] > 100.0 and (len(days) < 2 or days[-2] <= 100.0) and secs[s.sequence(i)[-1]] > 0
        else:
            assert days[-1] <= 100.0
        if s.stop[i] in (STOP_END, STOP_DEATH):
            assert vocab.tokens[s.sequence(i)[-1]] == ("[END]" if s.stop[i] == STOP_END else "[DEATH]")
        stops = np.isin(s.sequence(i)[:-1], [vocab["[END]"], vocab["[DEATH]"]])
        assert not stops.any()


def test_end_stop_and_no_stop_ids(vocab: Vocab) -> None:
    """A prompt that ended with [DEATH] can only end: [END] comes next and stops the row.
    `stop_ids=()` runs rows to the budget."""
    prompt = [
        vocab[t]
        for t in ("YEAR//2000", "AGE//40", "GENDER//F", "RACE//1", "[VS]", "VISIT//OP", "[VE]", "D3", "[DEATH]")
    ]
    model = micro(vocab)
    s = sample(
        model,
        vocab,
        np.array(prompt),
        np.array([0, len(prompt)]),
        SamplingConfig(max_new_tokens=10),
        num_samples=3,
        progress=False,
    )
    assert s.stop.tolist() == [STOP_END] * 3 and s.tokens.tolist() == [vocab["[END]"]] * 3
    s = sample(
        model,
        vocab,
        np.array(prompt[:4]),
        np.array([0, 4]),
        SamplingConfig(max_new_tokens=25, constrained=False),
        num_samples=2,
        progress=False,
        stop_ids=(),
    )
    assert s.lengths().tolist() == [25, 25] and (s.stop == STOP_TOKENS).all()


def test_context_limit_stops_rows(vocab: Vocab, histories: tuple[np.ndarray, np.ndarray]) -> None:
    """A prompt near max_seq_len gets only the room left; a longer one is a clear error."""
    toks, offs = histories
    longest = int(np.argmax(np.diff(offs)))
    p = toks[offs[longest] : offs[longest + 1]]
    model = micro(vocab, max_seq_len=len(p) + 4)
    s = sample(
        model,
        vocab,
        np.concatenate([p, toks[:4]]),
        np.array([0, len(p), len(p) + 4]),
        SamplingConfig(max_new_tokens=30),
        progress=False,
        stop_ids=(),
    )
    assert s.lengths().tolist() == [4, min(30, len(p))] and (s.stop == STOP_TOKENS).all()
    # one full row among many keeps riding in the batch (< 1/8 finished): same results, cache or not
    many = np.concatenate([p] + [toks[:4]] * 9)
    offsets = np.concatenate([[0], len(p) + 4 * np.arange(10)])
    for use_cache in (True, False):
        s = sample(
            model,
            vocab,
            many,
            offsets,
            SamplingConfig(max_new_tokens=30, batch_size=16),
            progress=False,
            stop_ids=(),
            use_cache=use_cache,
        )
        assert s.lengths().tolist() == [4] + [min(30, len(p))] * 9
    with pytest.raises(CehrxError, match="max_seq_len"):
        sample(model, vocab, np.resize(p, len(p) + 4), np.array([0, len(p) + 4]), SamplingConfig(), progress=False)


def test_num_samples_are_prompt_major(vocab: Vocab, histories: tuple[np.ndarray, np.ndarray]) -> None:
    """Row i * n + j continues prompt i: greedy samples equal the prompt sampled alone, whatever
    the batch size and the length sorting inside the engine."""
    toks, offs = histories
    model = micro(vocab)
    cfg = SamplingConfig(temperature=0.0, max_new_tokens=20, batch_size=7)
    s = sample(model, vocab, toks[: offs[6]], offs[:7], cfg, num_samples=3, progress=False)
    assert s.prompt_index.tolist() == [i for i in range(6) for _ in range(3)]
    for i in range(6):
        alone = sample(
            model, vocab, toks[offs[i] : offs[i + 1]], np.array([0, offs[i + 1] - offs[i]]), cfg, progress=False
        )
        for j in range(3):
            np.testing.assert_array_equal(s.sequence(3 * i + j), alone.sequence(0))


def test_ungrammatical_prompt_is_sampled_unconstrained_with_a_warning(vocab: Vocab) -> None:
    bad = [vocab[t] for t in ("YEAR//2000", "AGE//40", "GENDER//F", "RACE//1", "D3")]  # a gap before any visit
    good = bad[:4]
    with pytest.warns(UserWarning, match="1 prompt"):
        s = sample(
            micro(vocab),
            vocab,
            np.array(bad + good),
            np.array([0, 5, 9]),
            SamplingConfig(max_new_tokens=5),
            progress=True,
        )
    assert len(s) == 2 and vocab.tokens[s.sequence(1)[0]] == "[VS]"  # the valid prompt stays constrained


def test_no_prompts_gives_empty_samples(vocab: Vocab) -> None:
    s = sample(
        micro(vocab), vocab, np.zeros(0, np.int64), np.array([0]), SamplingConfig(), num_samples=3, progress=False
    )
    assert len(s) == 0 and s.offsets.tolist() == [0] and s.tokens.dtype == np.int32


def test_bad_settings_are_one_line_errors(vocab: Vocab) -> None:
    with pytest.raises(CehrxError, match="top_p"):
        SamplingConfig(top_p=0.0)
    with pytest.raises(CehrxError, match="vocab_size"):
        sample(
            GPT(GPTConfig(vocab_size=len(vocab) + 1, n_layer=1, n_embd=32, n_head=2)),
            vocab,
            np.zeros(4, np.int64),
            np.array([0, 4]),
            SamplingConfig(),
            progress=False,
        )


def test_the_sampling_block_is_the_dataclass() -> None:
    """configs/sampling/default.yaml declares every SamplingConfig field but the caller's, with its defaults;
    both task configs use it, and a key that is not an option is an error."""
    from dataclasses import fields

    from omegaconf import OmegaConf

    from cehrx.configs import config_dir
    from cehrx.sampling.config import CALLER_FIELDS
    from tests.conftest import compose_cfg

    block = OmegaConf.load(f"{config_dir()}/sampling/default.yaml")
    names = [f.name for f in fields(SamplingConfig) if f.name not in CALLER_FIELDS]
    assert sorted(block) == sorted(names)
    defaults = SamplingConfig()
    assert all(block[k] == getattr(defaults, k) for k in names if k != "seed")
    generate, zeroshot = (compose_cfg(f"task={t}", "seed=5").sampling for t in ("generate", "zeroshot"))
    assert SamplingConfig.from_mapping(generate) == SamplingConfig(seed=5)
    assert SamplingConfig.from_mapping(zeroshot) == SamplingConfig(seed=5, max_new_tokens=256, batch_size=1024)
    with pytest.raises(CehrxError, match="sampling.top_q is not a sampling option"):
        SamplingConfig.from_mapping({"top_q": 0.9})
    assert SamplingConfig.from_mapping({"temperature": 1, "top_p": "0.5"}).top_p == 0.5
