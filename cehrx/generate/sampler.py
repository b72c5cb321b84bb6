"""Batched autoregressive sampling with a KV cache: the engine of `generate` and `zeroshot`.

`sample(model, vocab, prompt_tokens, prompt_offsets, cfg, num_samples=...)` continues every
prompt `num_samples` times and returns the continuations as flat arrays (`Samples`).

How a run is organised (and why):

- **Waves.** Prompts are sorted by length and their `(prompt, sample)` rows cut into waves of
  `cfg.batch_size` rows, so prompts of similar length share a wave and little is padded
  (zero-shot histories range from a few to thousands of tokens). Results are put back in
  prompt-major order: row `i * num_samples + j` is sample `j` of prompt `i`.
- **Prefill once, replicate.** A wave's distinct prompts are left-padded into one `[P, L]`
  batch and run once; the KV cache rows are then repeated for each sample
  (`KVCache.select_rows`), so a prompt's history is never recomputed per sample. Left padding
  keeps every row's newest token in the last column; `key_mask` hides the padding keys and
  per-row `position_ids` start each sequence at 0, so a padded prompt gets exactly the
  logits it gets alone.
- **Decode.** One token per row per step through the cache (`[B, 1]` forward; the lm head
  runs on the real last position only, never on padding).
- **Stops.** A row stops at `[END]` or `[DEATH]` (included), when it has `max_new_tokens`
  tokens or its context is full (`max_seq_len`), or when its generated time tokens (gap and
  inpatient time, `cehrx.data.decode.token_seconds`) pass `max_days` (the crossing token is
  included). The reason is `Samples.stop`.
- **Shrinking batch.** Finished rows are dropped from the batch (cache, masks, states) as soon
  as at least 1/8 of the batch has finished, so compute follows the live rows; there is no
  refill (a wave ends when its last row stops, then the next wave is prefilled). Waves sorted
  by length finish at similar times, which keeps this simple scheme efficient.
- **Grammar.** With `cfg.constrained`, every step masks what the token grammar forbids in each
  row's state (`cehrx.generate.constraints.Grammar`), starting from the state the prompt ends
  in. A sample that ends with `[END]`/`[DEATH]` is then always valid for `check_sequence`; one
  cut by a budget may end inside a visit (cut it at its last `[VE]`).
- **Reproducible.** Each wave draws from its own generator seeded with `(cfg.seed, wave)`:
  the same inputs, seed and `batch_size` give the same samples (on the same device).

Everything runs under `torch.inference_mode()` with the model in eval mode (restored after).
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import asdict, dataclass

import numpy as np
import torch
from torch import Tensor

from cehrx.data.decode import token_seconds
from cehrx.data.vocab import DEATH, END, Vocab
from cehrx.errors import CehrxError
from cehrx.generate.constraints import Grammar
from cehrx.model.transformer import GPT

__all__ = ["STOP_DEATH", "STOP_END", "STOP_NAMES", "STOP_TIME", "STOP_TOKENS", "Samples", "SamplingConfig", "sample", "sample_next"]

STOP_END, STOP_DEATH, STOP_TOKENS, STOP_TIME = 0, 1, 2, 3
STOP_NAMES = ("end", "death", "tokens", "time")
_RUNNING = -1
COMPACT_FRACTION = 8  # drop finished rows once >= 1/8 of the batch has finished


@dataclass
class SamplingConfig:
    """How to sample (mirrors the `generate.*` config keys)."""

    temperature: float = 1.0
    top_k: int = 0  # 0 = off
    top_p: float = 1.0  # 1.0 = off
    max_new_tokens: int = 512  # token budget per sequence
    max_days: float | None = None  # time budget: stop once generated time tokens advance past this many days
    constrained: bool = True  # grammar-constrained decoding (mask tokens the grammar forbids)
    batch_size: int = 64  # sequences per forward batch
    seed: int = 0

    def __post_init__(self) -> None:
        if self.temperature < 0 or not math.isfinite(self.temperature):
            raise CehrxError(f"sampling temperature must be >= 0 (0 = greedy), got {self.temperature!r}")
        if self.top_k < 0:
            raise CehrxError(f"sampling top_k must be >= 0 (0 = off), got {self.top_k!r}")
        if not 0.0 < self.top_p <= 1.0:
            raise CehrxError(f"sampling top_p must be in (0, 1] (1 = off), got {self.top_p!r}")
        if self.max_new_tokens < 1:
            raise CehrxError(f"sampling max_new_tokens must be >= 1, got {self.max_new_tokens!r}")
        if self.max_days is not None and not self.max_days >= 0:
            raise CehrxError(f"sampling max_days must be >= 0 or null, got {self.max_days!r}")
        if self.batch_size < 1:
            raise CehrxError(f"sampling batch_size must be >= 1, got {self.batch_size!r}")

    def to_dict(self) -> dict:
        return asdict(self)


@dataclass
class Samples:
    """Generated continuations, flat: sample i is `tokens[offsets[i]:offsets[i+1]]`."""

    tokens: np.ndarray  # int32 flat: generated tokens only (prompt excluded); the stop token or the crossing time token included
    offsets: np.ndarray  # int64 [n+1]
    stop: np.ndarray  # int8 [n] STOP_* reason
    elapsed_days: np.ndarray  # float64 [n] days advanced by generated time tokens (incl. the crossing one)
    prompt_index: np.ndarray  # int64 [n] which prompt each sample continues

    def __len__(self) -> int:
        return len(self.stop)

    def lengths(self) -> np.ndarray:
        return np.diff(self.offsets)

    def sequence(self, i: int) -> np.ndarray:
        return self.tokens[self.offsets[i] : self.offsets[i + 1]]

    def stop_counts(self) -> dict[str, int]:
        """Samples per stop reason, e.g. for `generate.json`."""
        return {name: int((self.stop == i).sum()) for i, name in enumerate(STOP_NAMES)}


# --------------------------------------------------------------------------------------------
# one sampling step


def sample_next(logits: Tensor, temperature: float, top_k: int, top_p: float, generator: torch.Generator | None) -> Tensor:
    """Token ids `[B]` drawn from `logits` (`[B, V]`, float, -inf = forbidden).

    Temperature 0 is greedy. top-k keeps the k largest logits; top-p then keeps the smallest
    set of most probable tokens whose probability reaches `top_p` (renormalised after top-k,
    as Hugging Face does; the token that crosses `top_p` is kept, so one always survives).

    Why not `torch.multinomial` and a full sort: on CPU both cost far more than the model's
    own step at realistic vocabularies (multinomial draws V random numbers per row; a
    `[256, 30000]` sort takes longer than a forward of the base model). Here a row costs one
    uniform number and a `searchsorted` in its cumulative distribution, and top-p sorts only
    the top-k tokens that hold `top_p` of the mass (k grows x4 until they do, exact).
    """
    if temperature == 0:
        return logits.argmax(-1)
    if temperature != 1.0:
        logits = logits / temperature
    V = logits.shape[-1]
    if 0 < top_k < V:
        vals, idx = torch.topk(logits, top_k, dim=-1)  # sorted, descending
        probs = torch.softmax(vals, dim=-1)
        if top_p < 1.0:
            probs = _nucleus(probs, top_p)
        return idx.gather(-1, _draw(probs, generator)[:, None])[:, 0]
    probs = torch.softmax(logits, dim=-1)
    if top_p < 1.0:
        k = min(V, 64)
        while True:
            vals, idx = torch.topk(probs, k, dim=-1)
            if k == V or bool((vals.sum(-1) >= top_p).all()):
                break
            k = min(V, 4 * k)
        return idx.gather(-1, _draw(_nucleus(vals, top_p), generator)[:, None])[:, 0]
    return _draw(probs, generator)


def _nucleus(sorted_probs: Tensor, top_p: float) -> Tensor:
    """Zero the tokens (probabilities sorted descending) after the mass before them reaches top_p."""
    before = sorted_probs.cumsum(-1) - sorted_probs
    return sorted_probs.masked_fill(before >= top_p, 0.0)


def _draw(probs: Tensor, generator: torch.Generator | None) -> Tensor:
    """Inverse-CDF draw, one uniform per row, from non-negative (unnormalised) weights `[B, V]`.

    `searchsorted(..., right=True)` returns the first token whose cumulative weight exceeds the
    uniform, which always has a positive weight: a forbidden (zero) token never comes out. The
    clamp handles the float edge where `u * total` rounds up to `total`.
    """
    cdf = probs.cumsum(-1)
    total = cdf[:, -1:].contiguous()
    u = torch.rand(total.shape, generator=generator, device=probs.device, dtype=cdf.dtype) * total
    idx = torch.searchsorted(cdf, u, right=True)
    return torch.minimum(idx, torch.searchsorted(cdf, total))[:, 0]  # first index reaching the total: the last weighted token


# --------------------------------------------------------------------------------------------
# the engine


@dataclass
class _Prepared:
    """Per-run constants on the model's device."""

    device: torch.device
    grammar: Grammar | None
    forbidden: Tensor | None  # bool [n_states, V]: ~Grammar.allowed (one gather per step)
    pad_id: int  # the one token masked when unconstrained
    seconds: Tensor  # int64 [V] seconds each token advances the clock
    stop_ids: Tensor  # int64 [k] tokens that end a sequence
    end_id: int
    death_id: int
    max_seconds: float  # time budget in seconds (inf = none)
    cache_dtype: torch.dtype  # the keys' dtype: the weights', or autocast's when it is on


def sample(
    model: GPT,
    vocab: Vocab,
    prompt_tokens: np.ndarray,
    prompt_offsets: np.ndarray,
    cfg: SamplingConfig,
    *,
    num_samples: int = 1,
    progress: bool = True,
    use_cache: bool = True,
    stop_ids: Sequence[int] | None = None,
) -> Samples:
    """Continue each prompt `num_samples` times (prompt-major output, see the module doc).

    `prompt_tokens`/`prompt_offsets` are flat (prompt i is `tokens[offsets[i]:offsets[i+1]]`,
    at least one token, at most `max_seq_len - 1`). `use_cache=False` recomputes the whole
    prefix at every step (the reference the cache is tested and benchmarked against; same
    draws for the same seed). `stop_ids` overrides the stop tokens (default `[END]` and
    `[DEATH]`; `()` runs every row to its budget, as the benchmark does).
    """
    if num_samples < 1:
        raise CehrxError(f"num_samples must be >= 1, got {num_samples}")
    tokens = np.asarray(prompt_tokens, dtype=np.int64)
    offsets = np.asarray(prompt_offsets, dtype=np.int64)
    lengths = _check_prompts(model, vocab, tokens, offsets)
    prep = _prepare(model, vocab, cfg, stop_ids)
    n_prompts = len(lengths)
    init_state = prep.grammar.prompt_states(tokens, offsets) if prep.grammar is not None else np.zeros(n_prompts, np.int64)
    if prep.grammar is not None and prep.grammar.is_free(init_state).any():
        import warnings

        bad = np.flatnonzero(prep.grammar.is_free(init_state))
        warnings.warn(f"{len(bad)} prompt(s) break the token grammar (first: prompt {bad[0]}); they are sampled unconstrained", stacklevel=2)

    # rows in length order, cut into waves of batch_size rows
    order = np.argsort(lengths, kind="stable")
    rows = (order[:, None] * num_samples + np.arange(num_samples)[None, :]).reshape(-1)  # global row ids
    n_rows = n_prompts * num_samples
    waves: list[tuple[np.ndarray, np.ndarray, np.ndarray]] = []  # (global rows, [B, max_new] tokens, lengths)
    lens = np.zeros(n_rows, dtype=np.int64)
    stop = np.full(n_rows, _RUNNING, dtype=np.int8)
    elapsed = np.zeros(n_rows, dtype=np.float64)

    bar = _progress(progress, n_rows)
    was_training = model.training
    model.eval()
    try:
        with torch.inference_mode():
            for w, start in enumerate(range(0, n_rows, cfg.batch_size)):
                wave = rows[start : start + cfg.batch_size]
                gen = torch.Generator(device=prep.device).manual_seed(_wave_seed(cfg.seed, w))
                out, n, stops, secs = _run_wave(model, prep, cfg, tokens, offsets, wave // num_samples, init_state, gen, use_cache, bar)
                waves.append((wave, out, n))
                lens[wave], stop[wave], elapsed[wave] = n, stops, secs / 86400.0
    finally:
        model.train(was_training)
        if bar is not None:
            bar.close()
    out_offsets = np.concatenate([[0], np.cumsum(lens)]).astype(np.int64)
    return Samples(
        tokens=_scatter_rows(waves, out_offsets),
        offsets=out_offsets,
        stop=stop,
        elapsed_days=elapsed,
        prompt_index=np.repeat(np.arange(n_prompts, dtype=np.int64), num_samples),
    )


def _scatter_rows(waves: list[tuple[np.ndarray, np.ndarray, np.ndarray]], offsets: np.ndarray) -> np.ndarray:
    """Flat int32 tokens in global row order from each wave's `[B, max_new]` block (vectorised)."""
    flat = np.zeros(int(offsets[-1]), dtype=np.int32)
    for rows, out, n in waves:
        keep = np.arange(out.shape[1])[None, :] < n[:, None]
        within = np.arange(out.shape[1])[None, :].repeat(len(rows), 0)[keep]  # row-major, like out[keep]
        flat[np.repeat(offsets[rows], n) + within] = out[keep]
    return flat


def _check_prompts(model: GPT, vocab: Vocab, tokens: np.ndarray, offsets: np.ndarray) -> np.ndarray:
    if offsets.ndim != 1 or len(offsets) < 1 or offsets[0] != 0 or offsets[-1] != len(tokens):
        raise CehrxError(f"prompt_offsets must start at 0 and end at len(prompt_tokens)={len(tokens)}")
    lengths = np.diff(offsets)
    if (lengths < 1).any():
        raise CehrxError(f"prompt {int(np.flatnonzero(lengths < 1)[0])} is empty: every prompt needs at least its demographic tokens")
    limit = model.config.max_seq_len - 1
    if len(lengths) and lengths.max() > limit:
        raise CehrxError(f"prompt {int(lengths.argmax())} has {int(lengths.max())} tokens; the model's context (max_seq_len={model.config.max_seq_len}) "
                         f"leaves room for {limit}: cut histories shorter")
    if len(tokens) and (tokens.min() < 0 or tokens.max() >= len(vocab)):
        raise CehrxError(f"prompt token ids must be in [0, {len(vocab)}) (the model's vocab.json), got {int(tokens.min())}..{int(tokens.max())}")
    if model.config.vocab_size != len(vocab):
        raise CehrxError(f"the model has vocab_size={model.config.vocab_size} but the vocabulary has {len(vocab)} tokens: use the vocab.json saved with the model")
    return lengths


def _prepare(model: GPT, vocab: Vocab, cfg: SamplingConfig, stop_ids: Sequence[int] | None) -> _Prepared:
    device = model.wte.weight.device
    stops = [vocab[END], vocab[DEATH]] if stop_ids is None else list(stop_ids)
    grammar = Grammar.build(vocab).to(device) if cfg.constrained else None
    return _Prepared(
        device=device,
        grammar=grammar,
        forbidden=~grammar.allowed if grammar is not None else None,
        pad_id=vocab.pad_id,
        seconds=torch.from_numpy(token_seconds(vocab)).to(device),
        stop_ids=torch.tensor(stops, dtype=torch.int64, device=device),
        end_id=vocab[END],
        death_id=vocab[DEATH],
        max_seconds=math.inf if cfg.max_days is None else float(cfg.max_days) * 86400.0,
        cache_dtype=torch.get_autocast_dtype(device.type) if torch.is_autocast_enabled(device.type) else model.wte.weight.dtype,
    )


def _wave_seed(seed: int, wave: int) -> int:
    return (int(seed) * 1_000_003 + wave) % (2**63 - 1)


def _progress(enabled: bool, total: int):
    if not enabled:
        return None
    from tqdm.auto import tqdm

    return tqdm(total=total, unit="seq", desc="sampling", dynamic_ncols=True)


def _left_pad(tokens: np.ndarray, offsets: np.ndarray, prompts: np.ndarray, width: int, pad_id: int) -> tuple[np.ndarray, np.ndarray]:
    """`[P, width]` ids, left-padded, and the bool mask of real tokens (vectorised)."""
    lengths = offsets[prompts + 1] - offsets[prompts]
    col = np.arange(width)[None, :]
    start = width - lengths[:, None]
    real = col >= start
    src = offsets[prompts][:, None] + (col - start)
    ids = np.where(real, tokens[np.where(real, src, 0)], pad_id)
    return ids, real


def _run_wave(
    model: GPT,
    prep: _Prepared,
    cfg: SamplingConfig,
    tokens: np.ndarray,
    offsets: np.ndarray,
    row_prompt: np.ndarray,
    init_state: np.ndarray,
    gen: torch.Generator,
    use_cache: bool,
    bar,
) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """Sample every row of one wave to its stop: `[B, max_new]` tokens, lengths, stop reasons, seconds.

    `live` maps batch rows to wave rows; `alive` marks batch rows still sampling (finished rows
    ride along until the next compaction, their results already recorded).
    """
    device, max_seq_len = prep.device, model.config.max_seq_len
    uniq, inverse = np.unique(row_prompt, return_inverse=True)
    lengths = offsets[uniq + 1] - offsets[uniq]
    width = int(lengths.max())
    B = len(row_prompt)
    row_len = torch.from_numpy(lengths[inverse]).to(device)
    max_new = min(cfg.max_new_tokens, max_seq_len - int(lengths.min()))  # the shortest prompt has the most room

    ids_np, real_np = _left_pad(tokens, offsets, uniq, width, 0)
    ids, real = torch.from_numpy(ids_np).to(device), torch.from_numpy(real_np).to(device)
    idx = torch.from_numpy(inverse).to(device)
    pos = (torch.cumsum(real, dim=1) - 1).clamp_min(0)

    # prefill each distinct prompt once (lm head on the last, real, column only), then replicate per sample
    padded = not bool(real.all())  # equal-length prompts (generate) need no key mask at all
    cache = model.new_kv_cache(len(uniq), width + max_new, dtype=prep.cache_dtype) if use_cache else None
    h = model(ids, position_ids=pos, kv_cache=cache, key_mask=real if padded else None)
    logits = model.lm_head_logits(h[:, -1]).float()[idx]
    if cache is not None:
        cache.select_rows(idx)
    key_mask = torch.zeros(B, width + max_new, dtype=torch.bool, device=device)
    key_mask[:, :width] = real[idx]
    seq = torch.zeros(B, width + max_new, dtype=torch.int64, device=device) if cache is None else None
    if seq is not None:
        seq[:, :width] = ids[idx]

    state = torch.from_numpy(init_state[row_prompt]).to(device) if prep.grammar is not None else None
    out = torch.zeros(B, max_new, dtype=torch.int32, device=device)
    n_out = torch.zeros(B, dtype=torch.int64, device=device)
    stop_out = torch.full((B,), _RUNNING, dtype=torch.int8, device=device)
    secs_out = torch.zeros(B, dtype=torch.int64, device=device)

    live = torch.arange(B, device=device)
    alive = torch.ones(B, dtype=torch.bool, device=device)
    secs = torch.zeros(B, dtype=torch.int64, device=device)
    for step in range(max_new):
        if state is not None:
            logits.masked_fill_(prep.forbidden[state], float("-inf"))
        else:
            logits[:, prep.pad_id] = float("-inf")
        tok = sample_next(logits, cfg.temperature, cfg.top_k, cfg.top_p, gen)
        out[live, step] = tok.to(torch.int32)
        secs = secs + prep.seconds[tok]
        if state is not None:
            state = prep.grammar.step(state, tok)
        reason = _stop_reason(prep, tok, secs, row_len[live] + step + 1 >= max_seq_len, step + 1 >= max_new)
        finished = alive & (reason != _RUNNING)
        n_fin = int(finished.sum())  # the one host sync per step
        if n_fin:
            rows = live[finished]
            stop_out[rows] = reason[finished].to(torch.int8)
            n_out[rows] = step + 1
            secs_out[rows] = secs[finished]
            alive = alive & ~finished
            if bar is not None:
                bar.update(n_fin)
        n_alive = len(live) - int((~alive).sum()) if n_fin else None
        if n_fin and n_alive == 0:
            break
        col = width + step
        key_mask[live, col] = True
        if seq is not None:
            seq[live, col] = tok
        if n_fin and (len(live) - n_alive) * COMPACT_FRACTION >= len(live):
            keep = torch.nonzero(alive)[:, 0]
            live, tok, secs, alive = live[keep], tok[keep], secs[keep], alive[keep]
            state = state[keep] if state is not None else None
            if cache is not None:
                cache.select_rows(keep)
        kmask = key_mask[live, : col + 1] if padded else None
        # rows riding along after a full context would step past the rotary table: clamp (their output is discarded)
        if cache is not None:
            pos = (row_len[live] + step).clamp_max(max_seq_len - 1)[:, None]
            h = model(tok[:, None], position_ids=pos, kv_cache=cache, key_mask=kmask)
        elif padded:
            h = model(seq[live, : col + 1], position_ids=(torch.cumsum(kmask, dim=1) - 1).clamp(0, max_seq_len - 1), key_mask=kmask)
        else:
            h = model(seq[live, : col + 1])
        logits = model.lm_head_logits(h[:, -1]).float()
    return out.cpu().numpy(), n_out.cpu().numpy(), stop_out.cpu().numpy(), secs_out.cpu().numpy().astype(np.float64)


def _stop_reason(prep: _Prepared, tok: Tensor, secs: Tensor, context_full: Tensor, budget_spent: bool) -> Tensor:
    """STOP_* per row for the token just drawn, or _RUNNING. Precedence: [END]/[DEATH], then
    the time budget, then the token budget / full context."""
    reason = torch.where(context_full, STOP_TOKENS, _RUNNING) if not budget_spent else torch.full_like(tok, STOP_TOKENS)
    reason = torch.where(secs > prep.max_seconds, STOP_TIME, reason)
    is_stop = torch.isin(tok, prep.stop_ids)
    return torch.where(is_stop, torch.where(tok == prep.death_id, STOP_DEATH, STOP_END), reason)
