"""Windowed generation (`cehrx.generate.windows`): patients longer than the model's context."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch

from cehrx.data.grammar import check_sequence
from cehrx.data.shards import PROMPT_LEN
from cehrx.data.vocab import VE, VS, Vocab, time_token_days
from cehrx.errors import CehrxError
from cehrx.generate import windows
from cehrx.generate.patients import decode_samples, value_lookup
from cehrx.model.config import GPTConfig
from cehrx.model.transformer import GPT
from cehrx.sampling import STOP_END, STOP_TOKENS, Engine, Samples, SamplingConfig
from cehrx.sampling.constraints import Grammar

CTX = 48


@pytest.fixture(scope="module")
def vocab(synthetic_prepared: Path) -> Vocab:
    return Vocab.load(synthetic_prepared)


def micro(vocab: Vocab, max_seq_len: int = CTX) -> GPT:
    torch.manual_seed(0)
    return GPT(GPTConfig(vocab_size=len(vocab), n_layer=2, n_embd=32, n_head=2, max_seq_len=max_seq_len)).eval()


def prompts_of(vocab: Vocab, *rows: tuple[int, int]) -> np.ndarray:
    g = next(t for t in vocab.tokens if t.startswith("GENDER//"))
    r = next(t for t in vocab.tokens if t.startswith("RACE//"))
    return np.array([[vocab[f"YEAR//{y}"], vocab[f"AGE//{a}"], vocab[g], vocab[r]] for y, a in rows], dtype=np.int64)


def test_one_window_is_plain_sampling(vocab: Vocab) -> None:
    engine = Engine(micro(vocab), vocab, SamplingConfig(max_new_tokens=CTX - PROMPT_LEN, batch_size=8, seed=3))
    p = prompts_of(vocab, (2000, 30), (2010, 50))
    a = windows.sample_windows(engine, p)
    b = engine.sample(p.reshape(-1), np.arange(0, 9, 4), progress=False)
    assert np.array_equal(a.tokens, b.tokens) and np.array_equal(a.stop, b.stop)


def test_windows_carry_the_last_visits_behind_a_recomputed_prompt(
    vocab: Vocab,
) -> None:
    """A fake model that always fills its context with year-long visits: each next window starts at
    the first [VS] within the last `keep` tokens, its YEAR and AGE advanced by the years generated."""
    code = next(t for t, k in zip(vocab.tokens, vocab.kinds) if k == "code")
    year = min(
        (t for t in vocab.tokens if (time_token_days(t) or 0) >= 365.25), key=time_token_days
    )  # a gap of >= 1 year
    visit = np.array([vocab[year], vocab[VS], vocab[code], vocab[VE]], dtype=np.int64)
    seen = []

    class Fake(Engine):
        """Fills every context with year-long visits instead of asking the model."""

        def sample(self, tokens, offsets, *, num_samples=1, progress=False, prompt_ids=None):
            seqs = [tokens[offsets[i] : offsets[i + 1]] for i in range(len(offsets) - 1)]
            seen.append((seqs, self.cfg.seed))
            gen = [np.resize(visit, CTX - len(s)) for s in seqs]
            return Samples(
                np.concatenate(gen).astype(np.int32),
                np.concatenate([[0], np.cumsum([len(g) for g in gen])]),
                np.full(len(gen), STOP_TOKENS, np.int8),
                np.zeros(len(gen)),
                np.arange(len(gen)),
            )

    p = prompts_of(vocab, (1990, 20), (2000, 40))
    fake = Fake(micro(vocab), vocab, SamplingConfig(seed=5))
    out = windows.sample_windows(fake, p, max_total_tokens=150, keep=10)
    assert out.lengths().tolist() == [150, 150] and (out.stop == STOP_TOKENS).all()
    assert len({s for _, s in seen}) == len(seen), "every window draws its own random numbers"
    years, ages = value_lookup(vocab, "year"), value_lookup(vocab, "age")
    for seqs, _ in seen[1:]:
        for s, (y0, a0) in zip(seqs, [(1990, 20), (2000, 40)]):
            assert s[PROMPT_LEN] == vocab[VS] and len(s) - PROMPT_LEN <= 10
            assert years[s[0]] - y0 == ages[s[1]] - a0 >= 1, "year and age advance together"
    # the whole generated stream is the windows' continuations in order: visit after visit
    assert np.array_equal(out.sequence(0)[:8], np.resize(visit, 8))
    with pytest.raises(CehrxError, match="keep"):
        windows.sample_windows(fake, p, max_total_tokens=100, keep=CTX)
    # records end where the real data ends: each patient is cut at its first token past end_time
    end = int(np.datetime64("2010-01-01", "s").astype(np.int64))
    seen.clear()
    cut = windows.sample_windows(fake, p, max_total_tokens=1000, keep=10, end_time=end)
    clock = windows._Clock(vocab, p)
    for i in range(2):
        t = clock.start[i] + np.cumsum(clock.seconds[cut.sequence(i)])
        assert (t <= end).all() and cut.stop[i] == STOP_TOKENS
    assert cut.lengths()[1] < cut.lengths()[0] < 1000, (
        "born later in the data's time, the 2000 prompt reaches the end sooner"
    )
    assert len(seen) < 10, "no window starts once every record has passed the end"


def test_real_model_windows_make_valid_patients_longer_than_the_context(vocab: Vocab) -> None:
    torch.set_num_threads(1)
    model = micro(vocab)
    p = prompts_of(vocab, *[(2000 + i % 10, 20 + i) for i in range(24)])
    engine = Engine(model, vocab, SamplingConfig(max_new_tokens=CTX - PROMPT_LEN, batch_size=24, seed=1))
    s = windows.sample_windows(engine, p, max_total_tokens=200, keep=CTX // 2)
    assert (s.lengths() <= 200).all() and (s.lengths() > CTX).sum() >= 3, s.lengths()
    grammar = Grammar.build(vocab)
    for i in np.flatnonzero(s.stop == STOP_END):
        assert check_sequence(vocab, np.concatenate([p[i], s.sequence(i)]), grammar.inpatient_types) is None
    dec = decode_samples(vocab, p, s.tokens, s.offsets, np.arange(len(p)), seed=0, grammar=grammar)
    assert len(dec.arrays) >= len(p) // 2, dec.dropped
