"""The sampling engine (`cehrx.sampling.Engine`): recorded samples, KV cache vs recompute, batching,
seeds, scoring by grammar state, watched probabilities."""

from __future__ import annotations

import functools
import hashlib
from pathlib import Path

import numpy as np
import pytest
import torch

from cehrx.data.shards import load_split
from cehrx.data.vocab import Vocab
from cehrx.model.config import GPTConfig
from cehrx.model.transformer import GPT
from cehrx.sampling import STOP_TOKENS, Engine, SamplingConfig
from cehrx.sampling.constraints import Grammar
from cehrx.sampling.draws import sample_next

ENDS_OPEN = "sequence ends inside a visit or after a gap"  # a budget stop may cut a visit


pytestmark = pytest.mark.usefixtures("one_thread")  # micro-model steps are tiny: a second torch thread only spins


@pytest.fixture(scope="module")
def vocab(synthetic_prepared: Path) -> Vocab:
    return Vocab.load(synthetic_prepared)


@pytest.fixture(scope="module")
def histories(synthetic_prepared: Path) -> tuple[np.ndarray, np.ndarray]:
    """Real sequences cut after 4..60 tokens: bare demographic prompts and histories that end
    anywhere, inside visits included (as zero-shot cuts them)."""
    arr = load_split(synthetic_prepared, "train")
    rng = np.random.default_rng(0)
    lens = np.minimum(arr.lengths(), rng.integers(4, 61, len(arr)))
    lens[::5] = 4
    toks = np.concatenate([arr.tokens[o : o + n] for o, n in zip(arr.offsets[:-1], lens)])
    return toks.astype(np.int64), np.concatenate([[0], np.cumsum(lens)]).astype(np.int64)


def micro(vocab: Vocab, seed: int = 0, max_seq_len: int = 256) -> GPT:
    torch.manual_seed(seed)
    return GPT(GPTConfig(vocab_size=len(vocab), n_layer=2, n_embd=64, n_head=2, max_seq_len=max_seq_len)).eval()


def full_sequences(s, toks: np.ndarray, offs: np.ndarray) -> list[np.ndarray]:
    return [np.concatenate([toks[offs[p] : offs[p + 1]], s.sequence(i)]) for i, p in enumerate(s.prompt_index)]


def sample(
    model: GPT,
    vocab: Vocab,
    toks: np.ndarray,
    offs: np.ndarray,
    cfg: SamplingConfig,
    *,
    stop_ids=None,
    watch_ids=None,
    **kw,
):
    """One engine, one call."""
    return Engine(model, vocab, cfg, stop_ids=stop_ids, watch_ids=watch_ids).sample(toks, offs, **kw)


# ------------------------------------------------------------------------------------- sampling


def digest(s) -> str:
    h = hashlib.sha256()
    for a in (s.tokens.astype(np.int32), s.offsets.astype(np.int64), s.stop.astype(np.int8)):
        h.update(a.tobytes())
    return h.hexdigest()[:16]


# Recorded with the sampler before it became `cehrx.sampling.Engine` (`cehrx/generate/sampler.py`,
# commit 64420d5): the same model, prompts and seed must keep giving these samples.
RECORDED = {
    "constrained, watched, time budget": ("7716627eb4999d99", [24, 40, 40, 5, 40, 6, 40, 1], 151.8164804726839),
    "unconstrained, top-k, top-p, temperature": ("d71cfdaedba0f2f5", [30] * 8, None),
    "recompute, no cache": ("e2f4b01f5109578f", [30, 7, 4, 30, 30, 30, 30, 1], None),
}


def test_engine_reproduces_recorded_samples(vocab: Vocab, histories: tuple[np.ndarray, np.ndarray]) -> None:
    """Fixed model, prompts and seeds: the engine draws exactly the samples recorded before the refactor."""
    toks, offs = histories
    model = micro(vocab)
    codes = np.flatnonzero(np.array([k == "code" for k in vocab.kinds]))
    runs = {
        "constrained, watched, time budget": (
            Engine(
                model,
                vocab,
                SamplingConfig(max_new_tokens=40, max_days=300.0, batch_size=8, seed=3),
                watch_ids=codes[::3],
            ),
            True,
        ),
        "unconstrained, top-k, top-p, temperature": (
            Engine(
                model,
                vocab,
                SamplingConfig(
                    max_new_tokens=30, batch_size=5, seed=11, temperature=0.8, top_k=40, top_p=0.9, constrained=False
                ),
            ),
            True,
        ),
        "recompute, no cache": (Engine(model, vocab, SamplingConfig(max_new_tokens=30, batch_size=7, seed=2)), False),
    }
    for name, (engine, use_cache) in runs.items():
        s = engine.sample(toks[: offs[12]], offs[:13], num_samples=2, progress=False, use_cache=use_cache)
        want_digest, want_lengths, want_watch = RECORDED[name]
        assert s.lengths()[:8].tolist() == want_lengths, name
        assert digest(s) == want_digest, name
        if want_watch is None:
            assert s.watch_prob is None
        else:
            assert float(s.watch_prob.astype(np.float64).sum()) == pytest.approx(want_watch, rel=1e-5)


def test_one_engine_many_calls(vocab: Vocab, histories: tuple[np.ndarray, np.ndarray]) -> None:
    """`with_settings` shares the engine's tables; its samples are those of a fresh engine with those settings,
    and the original keeps its own settings."""
    toks, offs = histories
    model = micro(vocab)
    engine = Engine(model, vocab, SamplingConfig(max_new_tokens=20, batch_size=16, seed=1))
    other = engine.with_settings(seed=9, max_days=50.0)
    assert other.grammar is engine.grammar and other.state_heads is engine.state_heads and engine.cfg.seed == 1
    a = other.sample(toks, offs, num_samples=2, progress=False)
    b = Engine(model, vocab, SamplingConfig(max_new_tokens=20, batch_size=16, seed=9, max_days=50.0)).sample(
        toks, offs, num_samples=2, progress=False
    )
    for field in ("tokens", "offsets", "stop", "elapsed_days"):
        np.testing.assert_array_equal(getattr(a, field), getattr(b, field))
    again = engine.sample(toks, offs, num_samples=2, progress=False)
    np.testing.assert_array_equal(again.tokens, engine.sample(toks, offs, num_samples=2, progress=False).tokens)


def test_kv_cache_sampling_equals_full_recompute(vocab: Vocab, histories: tuple[np.ndarray, np.ndarray]) -> None:
    """Same seed, with and without the cache: the same draws, so the same samples (stops and
    the shrinking batch included)."""
    toks, offs = histories
    cfg = SamplingConfig(max_new_tokens=40, batch_size=16, seed=3)
    a = sample(micro(vocab), vocab, toks[: offs[12]], offs[:13], cfg, num_samples=2, progress=False)
    b = sample(micro(vocab), vocab, toks[: offs[12]], offs[:13], cfg, num_samples=2, progress=False, use_cache=False)
    np.testing.assert_array_equal(a.offsets, b.offsets)
    np.testing.assert_array_equal(a.tokens, b.tokens)
    np.testing.assert_array_equal(a.stop, b.stop)


def test_samples_do_not_depend_on_batching(vocab: Vocab, histories: tuple[np.ndarray, np.ndarray]) -> None:
    """Each (row, step) has its own random number, so a tiny batch that refills finished rows
    with new prompts dozens of times, one batch holding everything, and the cache-free
    reference all give the same samples."""
    toks, offs = histories
    model = micro(vocab)
    runs = [
        sample(
            model,
            vocab,
            toks[: offs[20]],
            offs[:21],
            SamplingConfig(max_new_tokens=30, batch_size=bs, seed=5, top_k=40),
            num_samples=3,
            progress=False,
            use_cache=cache,
        )
        for bs, cache in ((5, True), (64, True), (7, False))
    ]
    assert (runs[0].stop != STOP_TOKENS).sum() > 10  # rows stopped early, so the small batch refilled
    cfg = SamplingConfig(max_new_tokens=30, batch_size=16, seed=5, top_k=40)
    halves = [
        sample(
            model,
            vocab,
            toks[offs[a] : offs[b]],
            offs[a : b + 1] - offs[a],
            cfg,
            num_samples=3,
            progress=False,
            prompt_ids=np.arange(a, b),
        )
        for a, b in ((0, 8), (8, 20))
    ]  # split over two calls with their global prompt ids
    np.testing.assert_array_equal(np.concatenate([h.tokens for h in halves]), runs[0].tokens)
    # one sample per prompt: the cache folds each prompt into its row (no sharing), same samples
    one = [
        sample(model, vocab, toks[: offs[20]], offs[:21], cfg, num_samples=1, progress=False, use_cache=c)
        for c in (True, False)
    ]
    np.testing.assert_array_equal(one[0].tokens, one[1].tokens)
    np.testing.assert_array_equal(one[0].stop, one[1].stop)
    for other in runs[1:]:
        for field in ("tokens", "offsets", "stop", "elapsed_days"):
            np.testing.assert_array_equal(getattr(runs[0], field), getattr(other, field))


@pytest.mark.parametrize("top", [(0, 1.0), (40, 0.9)], ids=["plain", "top-k-top-p"])
def test_scoring_by_grammar_state_draws_what_the_full_head_draws(
    vocab: Vocab, histories: tuple[np.ndarray, np.ndarray], top: tuple[int, float], monkeypatch: pytest.MonkeyPatch
) -> None:
    """The lm head scored per grammar state on its allowed tokens only gives the draws of the
    full head with the forbidden tokens masked (same seed, same futures)."""
    from cehrx.sampling import engine

    toks, offs = histories
    model = micro(vocab)
    cfg = SamplingConfig(max_new_tokens=40, batch_size=32, top_k=top[0], top_p=top[1], seed=3)
    by_state = sample(model, vocab, toks, offs, cfg, num_samples=3, progress=False)
    monkeypatch.setattr(engine, "_score_by_state", lambda hidden: False)
    full = sample(model, vocab, toks, offs, cfg, num_samples=3, progress=False)
    assert len(by_state.tokens) > 100
    for field in ("tokens", "offsets", "stop", "elapsed_days"):
        np.testing.assert_array_equal(getattr(by_state, field), getattr(full, field))


def test_prefill_in_small_chunks_and_refills_gives_the_same_samples(
    vocab: Vocab, histories: tuple[np.ndarray, np.ndarray], monkeypatch: pytest.MonkeyPatch
) -> None:
    """Prompts prefilled a few at a time (right-aligned into one buffer, the running batch's when
    they join it) sample exactly what one prefill forward per batch samples."""
    from cehrx.sampling import stream

    toks, offs = histories
    model = micro(vocab)
    cfg = SamplingConfig(max_new_tokens=30, batch_size=12, seed=5)
    whole = sample(model, vocab, toks, offs, cfg, num_samples=3, progress=False)
    monkeypatch.setattr(stream, "PREFILL_TOKENS", 8)  # about one prompt per forward
    chunked = sample(model, vocab, toks, offs, cfg, num_samples=3, progress=False)
    assert len(offs) - 1 > 4 and len(whole.tokens) > 50
    for field in ("tokens", "offsets", "stop", "elapsed_days"):
        np.testing.assert_array_equal(getattr(whole, field), getattr(chunked, field))


def test_same_seed_same_output(vocab: Vocab, histories: tuple[np.ndarray, np.ndarray]) -> None:
    toks, offs = histories
    model = micro(vocab)
    cfg = SamplingConfig(max_new_tokens=60, batch_size=24, top_k=50, top_p=0.95, temperature=0.9, seed=7)
    a = sample(model, vocab, toks, offs, cfg, num_samples=2, progress=False)
    b = sample(model, vocab, toks, offs, cfg, num_samples=2, progress=False)
    for field in ("tokens", "offsets", "stop", "elapsed_days", "prompt_index"):
        np.testing.assert_array_equal(getattr(a, field), getattr(b, field))
    c = sample(model, vocab, toks, offs, SamplingConfig(**{**cfg.to_dict(), "seed": 8}), num_samples=2, progress=False)
    assert not np.array_equal(a.tokens, c.tokens)
    assert model.training is False and not torch.is_inference_mode_enabled()


def test_torch_splitmix_is_the_numpy_one() -> None:
    """`draws._splitmix` (signed int64 tensors) gives the bits of `cehrx.data.hashing.splitmix64` (uint64)."""
    from cehrx.data.hashing import splitmix64
    from cehrx.sampling.draws import _splitmix

    x = np.array([0, 1, 12345, 2**62, 2**63 - 1], dtype=np.uint64)
    torch_bits = _splitmix(torch.from_numpy(x.astype(np.int64))).numpy().view(np.uint64)
    assert np.array_equal(torch_bits, splitmix64(x))
    assert hex(int(torch_bits[0])) == "0xe220a8397b1dcdaf"  # splitmix64's first output from seed 0


def test_sample_next_top_k_top_p() -> None:
    logits = torch.log(torch.tensor([[0.5, 0.3, 0.15, 0.05]])).repeat(2000, 1)
    g = torch.Generator().manual_seed(0)
    assert set(sample_next(logits, 1.0, 0, 0.7, g).tolist()) == {0, 1}
    assert set(sample_next(logits, 1.0, 3, 1.0, g).tolist()) == {0, 1, 2}
    assert set(sample_next(logits, 1.0, 0, 0.01, g).tolist()) == {0}
    assert set(sample_next(logits, 0.0, 0, 1.0, g).tolist()) == {0}
    freq = torch.bincount(sample_next(logits.repeat(10, 1), 1.0, 0, 1.0, g), minlength=4) / 20000
    torch.testing.assert_close(freq, torch.tensor([0.5, 0.3, 0.15, 0.05]), atol=0.015, rtol=0)
    masked = logits.clone()
    masked[:, 0] = float("-inf")
    masked[:, 3] = float("-inf")
    assert set(sample_next(masked, 1.0, 0, 1.0, g).tolist()) == {1, 2}
    hot = sample_next(logits, 5.0, 0, 1.0, g)
    assert (hot == 3).float().mean() > 0.15  # flattened by the temperature (0.05 -> ~0.2)


@torch.no_grad()
def test_watched_probability_is_the_exact_step_probability(
    vocab: Vocab, histories: tuple[np.ndarray, np.ndarray]
) -> None:
    """`watch_ids`: over two steps, the mean of p1 + [x1 not watched] * p2 (the hazard sum of
    `cehrx.zeroshot.predict`) equals P(a watched token among the first two draws), enumerated
    exactly from the model and the grammar; the Monte Carlo indicator agrees within its (larger) noise."""
    toks, offs = histories
    grammar = Grammar.build(vocab)
    states = grammar.prompt_states(toks, offs)
    codes = np.flatnonzero(np.array([k == "code" for k in vocab.kinds]))
    watch = codes[::3]
    allows_codes = grammar.allowed[torch.from_numpy(states)][:, torch.from_numpy(codes)].any(1).numpy()
    inside = int(np.flatnonzero(allows_codes & (np.diff(offs) > 8))[0])  # a history that ends inside a visit
    prompt = toks[offs[inside] : offs[inside + 1]]
    model = micro(vocab, seed=4)

    def dist(seq: np.ndarray, state: int) -> torch.Tensor:  # the constrained next-token distribution
        logits = model.lm_head_logits(model(torch.from_numpy(seq)[None])[:, -1])[0].float()
        return torch.softmax(logits.masked_fill(~grammar.allowed[state], float("-inf")), -1)

    s0 = int(states[inside])
    p1 = dist(prompt, s0)
    exact = float(p1[watch].sum())
    stops = {vocab["[END]"], vocab["[DEATH]"]}
    for x1 in torch.nonzero(p1 > 0)[:, 0].tolist():
        if x1 in set(watch.tolist()) or x1 in stops:
            continue
        s1 = int(grammar.step(torch.tensor([s0]), torch.tensor([x1]))[0])
        exact += float(p1[x1]) * float(dist(np.append(prompt, x1), s1)[watch].sum())
    n = 3000
    draw = functools.partial(
        sample,
        model,
        vocab,
        prompt,
        np.array([0, len(prompt)]),
        SamplingConfig(max_new_tokens=2, batch_size=512, seed=0),
        num_samples=n,
        progress=False,
    )
    s = draw(watch_ids=watch)
    assert s.watch_prob is not None and s.watch_prob.shape == s.tokens.shape
    first, second = s.offsets[:-1], s.offsets[:-1] + 1
    two = s.lengths() == 2
    hit1 = np.isin(s.tokens[first], watch)
    hazard = s.watch_prob[first] + np.where(two & ~hit1, s.watch_prob[np.minimum(second, len(s.tokens) - 1)], 0.0)
    mc = hit1 | (two & np.isin(s.tokens[np.minimum(second, len(s.tokens) - 1)], watch))
    assert abs(hazard.mean() - exact) < 4 * hazard.std() / np.sqrt(n) + 1e-6, (hazard.mean(), exact)
    assert abs(mc.mean() - exact) < 4 * mc.std() / np.sqrt(n) + 1e-6
    assert 0.05 < exact < 0.95 and hazard.std() < mc.std(), (exact, "the hazard sum varies less than the indicator")
    np.testing.assert_allclose(
        s.watch_prob[first], float(p1[watch].sum()), rtol=1e-4
    )  # the first step is exact per row
    plain = draw()
    assert plain.watch_prob is None and np.array_equal(plain.tokens, s.tokens), "watching changes no draw"
