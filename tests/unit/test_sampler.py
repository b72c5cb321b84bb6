"""The sampling engine: KV cache vs recompute, padding, seeds, grammar constraints, stops, ordering."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest
import torch

from cehrx.data.decode import token_seconds
from cehrx.data.grammar import check_sequence
from cehrx.data.shards import load_split
from cehrx.data.vocab import Vocab
from cehrx.errors import CehrxError
from cehrx.generate.constraints import Grammar
from cehrx.generate.sampler import (
    STOP_DEATH,
    STOP_END,
    STOP_TIME,
    STOP_TOKENS,
    SamplingConfig,
    sample,
    sample_next,
)
from cehrx.model.config import GPTConfig
from cehrx.model.kv_cache import KVCache
from cehrx.model.transformer import GPT

ENDS_OPEN = "sequence ends inside a visit or after a gap"  # a budget stop may cut a visit


@pytest.fixture(autouse=True, scope="module")
def one_thread() -> Iterator[None]:
    """Micro-model steps are tiny: on a loaded 2-core machine, torch's second thread only spins."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


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


# ------------------------------------------------------------------------------------- model level


@torch.no_grad()
def test_left_padded_cached_logits_equal_each_prompt_alone(vocab: Vocab) -> None:
    """Mixed-length prompts, left-padded in one batch with a key mask and per-row positions,
    prefilled then decoded through the KV cache, give every prompt its own full-recompute logits."""
    model = micro(vocab)
    g = torch.Generator().manual_seed(1)
    lengths, extra = [3, 11, 7, 1], 5
    seqs = [torch.randint(1, len(vocab), (n + extra,), generator=g) for n in lengths]
    width = max(lengths)
    ids = torch.zeros(len(seqs), width + extra, dtype=torch.long)
    real = torch.zeros_like(ids, dtype=torch.bool)
    for i, (s, n) in enumerate(zip(seqs, lengths)):
        ids[i, width - n :] = s
        real[i, width - n :] = True
    pos = (real.cumsum(1) - 1).clamp_min(0)
    cache = model.new_kv_cache(len(seqs), width + extra)
    steps = [model(ids[:, :width], position_ids=pos[:, :width], kv_cache=cache, key_mask=real[:, :width])[:, -1:]]
    for c in range(width, width + extra):
        steps.append(
            model(ids[:, c : c + 1], position_ids=pos[:, c : c + 1], kv_cache=cache, key_mask=real[:, : c + 1])
        )
    cached = model.lm_head_logits(
        torch.cat(steps, 1)
    )  # [B, 1 + extra, V]: logits after each prompt token from the last
    for i, (s, n) in enumerate(zip(seqs, lengths)):
        alone = model.lm_head_logits(model(s[None]))[0, n - 1 :]
        torch.testing.assert_close(cached[i], alone, atol=1e-5, rtol=1e-5)
    assert torch.isfinite(model(ids[:, :width], position_ids=pos[:, :width], key_mask=real[:, :width])).all()


def test_key_mask_is_rejected_for_packed_input(vocab: Vocab) -> None:
    model = micro(vocab)
    with pytest.raises(ValueError, match="unpacked"):
        model(
            torch.zeros(4, dtype=torch.long),
            cu_seqlens=torch.tensor([0, 4], dtype=torch.int32),
            key_mask=torch.ones(1, 4, dtype=torch.bool),
        )
    with pytest.raises(ValueError, match="key_mask must be"):
        model(torch.zeros(2, 4, dtype=torch.long), key_mask=torch.ones(2, 3, dtype=torch.bool))


def test_kv_cache_select_rows_and_grow() -> None:
    cache = KVCache(2, 3, 4, 1, 2)
    k = torch.arange(3 * 4 * 2, dtype=torch.float32).view(3, 4, 1, 2)
    for layer in range(2):
        cache.update(layer, k, k + 1)
    cache.advance(4)
    cache.select_rows(torch.tensor([2, 2, 0]))
    cache.grow(6)
    assert cache.batch_size == 3 and cache.max_len == 6 and cache.length == 4
    keys, values = cache.update(1, k[:2, :1].repeat(3, 2, 1, 1)[:3], k[:3, :2])  # two more tokens
    torch.testing.assert_close(keys[:, :4], k[[2, 2, 0]])
    torch.testing.assert_close(values[:, :4], k[[2, 2, 0]] + 1)
    assert keys.shape == (3, 6, 1, 2)


# ------------------------------------------------------------------------------------- sampling


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


def _shared_prefix_cache(model, g: torch.Generator, lengths: list[int], n_slots: int):
    """Random left-padded prompts of `lengths`, prefilled; a shared-prefix cache with `n_slots`
    rows per prompt, and each row's prompt ids (to replay it alone)."""
    from cehrx.model.kv_cache import SharedPrefixKVCache

    width = max(lengths)
    ids = torch.randint(1, model.config.vocab_size, (len(lengths), width), generator=g)
    real = torch.arange(width)[None, :] >= width - torch.tensor(lengths)[:, None]
    prefix = model.new_kv_cache(len(lengths), width)
    model(ids, position_ids=(real.cumsum(1) - 1).clamp_min(0), kv_cache=prefix, key_mask=real)
    rows = torch.arange(len(lengths) * n_slots)
    cache = SharedPrefixKVCache(prefix, real, rows // n_slots, rows % n_slots, n_slots)
    return cache, [ids[p, width - n :] for p, n in enumerate(lengths) for _ in range(n_slots)]


def _decode_and_check(model, cache, seqs: list[torch.Tensor], g: torch.Generator) -> list[torch.Tensor]:
    """One random token per row through the cache; each row's hidden state must equal a full
    forward of that row alone. Returns the rows with their new token."""
    tok = torch.randint(1, model.config.vocab_size, (len(seqs),), generator=g)
    seqs = [torch.cat((s, t[None])) for s, t in zip(seqs, tok)]
    pos = torch.tensor([len(s) - 1 for s in seqs])[:, None]
    h = model(tok[:, None], position_ids=pos, kv_cache=cache)[:, 0]
    for i, s in enumerate(seqs):
        torch.testing.assert_close(h[i], model(s[None])[0, -1], atol=1e-5, rtol=1e-5)
    return seqs


@torch.no_grad()
def test_shared_prefix_cache_equals_replicated_cache(vocab: Vocab) -> None:
    """Rows joining (`extend`, other prompts, later start) and leaving (`select_rows`) a shared-
    prefix cache get the logits of a plain cache replicated per row, i.e. of each row alone."""
    model = micro(vocab)
    g = torch.Generator().manual_seed(2)

    def prefill(lengths: list[int], n_slots: int):
        return _shared_prefix_cache(model, g, lengths, n_slots)

    cache, seqs = prefill([5, 9], 3)
    for step in range(4):
        if step == 2:  # two more prompts join, one longer than any before; then two rows leave
            new, new_seqs = prefill([12, 2], 3)
            cache.extend(new)
            seqs += new_seqs
            keep = torch.tensor([0, 2, 3, 4, 6, 7, 8, 9, 10, 11])
            cache.select_rows(keep)
            seqs = [seqs[i] for i in keep.tolist()]
        seqs = _decode_and_check(model, cache, seqs, g)


@pytest.mark.parametrize("fused", [True, False], ids=["cpu-flash", "reference"])
@torch.no_grad()
def test_shared_prefix_cache_tiers_compaction_and_buffer_reuse(
    vocab: Vocab, fused: bool, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The zero-shot life of a cache: samples stop unevenly (one busy prompt: a two-tier grid),
    whole prompts leave (their keys are compacted away, the prefix narrows), narrower and wider
    prompts join into the reused buffers, and rows outgrow the first 16 generated columns.
    Every row still gets the logits it gets alone, with the fused CPU kernel and with the
    reference formula other devices use."""
    import cehrx.model.kv_cache as kv
    from cehrx.model.kv_cache import compaction_order

    if not fused:
        monkeypatch.setattr(kv, "_FLASH_CPU", None)
    model = micro(vocab)
    g = torch.Generator().manual_seed(3)

    def prefill(lengths: list[int], n_slots: int):
        return _shared_prefix_cache(model, g, lengths, n_slots)

    cache, seqs = prefill([7, 20, 11, 4], 5)
    prompt = [i // 5 for i in range(20)]

    def keep_rows(alive: list[bool]) -> None:
        nonlocal seqs, prompt
        keep = compaction_order(torch.tensor(alive))
        cache.select_rows(keep)
        seqs, prompt = [seqs[i] for i in keep.tolist()], [prompt[i] for i in keep.tolist()]

    tiers = set()
    for step in range(22):
        if step == 1:  # prompt 1 keeps its 5 samples, the others one each: two tiers
            keep_rows([p == 1 or i % 5 == 0 for i, p in enumerate(prompt)])
        if step == 3:  # prompts 1 (the longest) and 3 leave: dropped, prefix cut to 11 columns
            keep_rows([p in (0, 2) for p in prompt])
            assert cache.n_prompts == 2 and cache.width == 11
        if step in (
            4,
            5,
            7,
        ):  # prompts join: narrower (in the buffer), wider (widened in the buffer), then one too many (buffer grows)
            new, new_seqs = prefill(*{4: ([3], 2), 5: ([15], 3), 7: ([6], 2)}[step])
            cache.extend(new)
            seqs += new_seqs
            assert cache.width == {4: 11, 5: 15, 7: 15}[step] and cache._pk.shape[1] == (4 if step < 7 else 8)
        tiers.add(len(cache._tiers))
        seqs = _decode_and_check(model, cache, seqs, g)
    assert tiers == {1, 2} and cache.length > 16


@pytest.mark.parametrize("top", [(0, 1.0), (40, 0.9)], ids=["plain", "top-k-top-p"])
def test_scoring_by_grammar_state_draws_what_the_full_head_draws(
    vocab: Vocab, histories: tuple[np.ndarray, np.ndarray], top: tuple[int, float], monkeypatch: pytest.MonkeyPatch
) -> None:
    """The lm head scored per grammar state on its allowed tokens only gives the draws of the
    full head with the forbidden tokens masked (same seed, same futures)."""
    from cehrx.generate import sampler

    toks, offs = histories
    model = micro(vocab)
    cfg = SamplingConfig(max_new_tokens=40, batch_size=32, top_k=top[0], top_p=top[1], seed=3)
    by_state = sample(model, vocab, toks, offs, cfg, num_samples=3, progress=False)
    monkeypatch.setattr(sampler, "_score_by_state", lambda hidden: False)
    full = sample(model, vocab, toks, offs, cfg, num_samples=3, progress=False)
    assert len(by_state.tokens) > 100
    for field in ("tokens", "offsets", "stop", "elapsed_days"):
        np.testing.assert_array_equal(getattr(by_state, field), getattr(full, field))


def test_prefill_in_small_chunks_and_refills_gives_the_same_samples(
    vocab: Vocab, histories: tuple[np.ndarray, np.ndarray], monkeypatch: pytest.MonkeyPatch
) -> None:
    """Prompts prefilled a few at a time (right-aligned into one buffer, the running batch's when
    they join it) sample exactly what one prefill forward per batch samples."""
    from cehrx.generate import sampler

    toks, offs = histories
    model = micro(vocab)
    cfg = SamplingConfig(max_new_tokens=30, batch_size=12, seed=5)
    whole = sample(model, vocab, toks, offs, cfg, num_samples=3, progress=False)
    monkeypatch.setattr(sampler, "PREFILL_TOKENS", 8)  # about one prompt per forward
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
    s = sample(
        model,
        vocab,
        prompt,
        np.array([0, len(prompt)]),
        SamplingConfig(max_new_tokens=2, batch_size=512, seed=0),
        num_samples=n,
        progress=False,
        watch_ids=watch,
    )
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
    plain = sample(
        model,
        vocab,
        prompt,
        np.array([0, len(prompt)]),
        SamplingConfig(max_new_tokens=2, batch_size=512, seed=0),
        num_samples=n,
        progress=False,
    )
    assert plain.watch_prob is None and np.array_equal(plain.tokens, s.tokens), "watching changes no draw"
