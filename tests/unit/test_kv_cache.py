"""KV caches for sampling: left-padded prefill, row selection, and the shared-prefix cache
(`cehrx.model.kv_cache`) give every row the logits it gets alone."""

from __future__ import annotations

import pytest
import torch

from cehrx.data.vocab import Vocab
from cehrx.model.kv_cache import KVCache

# the fixtures and model of the engine tests, shared
from tests.unit.test_sampling import micro, vocab  # noqa: F401

pytestmark = pytest.mark.usefixtures("one_thread")  # as in test_sampling: a second torch thread only spins


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


def _shared_prefix_cache(model, g: torch.Generator, lengths: list[int], n_slots: int):
    """Random left-padded prompts of `lengths`, prefilled; a shared-prefix cache with `n_slots`
    rows per prompt, and each row's prompt ids (to replay it alone)."""
    from cehrx.model.shared_prefix import SharedPrefixKVCache

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
    import cehrx.model.kernels as kv
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


@torch.no_grad()
def test_cached_decoding_uses_the_configured_backend(vocab: Vocab, monkeypatch: pytest.MonkeyPatch) -> None:
    """Prefill, `KVCache` decoding and `SharedPrefixKVCache` decoding run the model's own
    `attn_backend` (through `attention.BACKENDS`), not `auto`: on CPU `auto` is sdpa, so a
    `flex` model that decoded with `auto` would never reach the flex row of the table."""
    import dataclasses

    from cehrx.model import attention as A

    used: list[str] = []

    def spy(use: str, fn):
        def call(*args, **kwargs):
            used.append(use)
            return fn(*args, **kwargs)

        return call

    row = A.BACKENDS["flex"]
    monkeypatch.setitem(
        A.BACKENDS, "flex", dataclasses.replace(row, padded=spy("padded", row.padded), merged=spy("merged", row.merged))
    )
    model = micro(vocab)
    model.config.attn_backend = "flex"
    g = torch.Generator().manual_seed(4)
    cache, seqs = _shared_prefix_cache(model, g, [5, 9], 3)  # prefill through a KVCache
    assert used and set(used) == {"padded"}
    _decode_and_check(model, cache, seqs, g)  # decoding through the shared-prefix cache
    assert "merged" in used
