"""Batched autoregressive sampling with a KV cache: the engine of `generate` and `zeroshot`.

`sample(model, vocab, prompt_tokens, prompt_offsets, cfg, num_samples=...)` continues every
prompt `num_samples` times and returns the continuations as flat arrays (`Samples`).

How a run is organised (and why):

- **A stream of rows.** Every `(prompt, sample)` pair is a row; row `i * num_samples + j` is
  sample `j` of prompt `i` (results come back in that prompt-major order). Rows enter the batch
  longest prompt first, at most `cfg.batch_size` at a time, so prompts of similar length share
  a prefill and pad little (zero-shot histories range from a few to thousands of tokens).
- **Prefill once, share the keys.** Entering prompts run longest first, left-padded, in
  forwards of about `PREFILL_TOKENS` tokens, written straight into the batch's prompt buffer;
  `key_mask` hides the padding keys and per-row `position_ids` start each sequence at 0, so a
  padded prompt gets exactly the logits it gets alone. Its samples then read its cached keys
  together (`SharedPrefixKVCache`): one copy per prompt, not per sample.
- **Decode.** One token per row per step through the cache (`[B, 1]` forward; the lm head
  runs on the real last position only, never on padding, and with the grammar on only over
  the tokens the row's grammar state allows).
- **Stops.** A row stops at `[END]` or `[DEATH]` (included), when it has `max_new_tokens`
  tokens or its context is full (`max_seq_len`), or when its generated time tokens (gap and
  inpatient time, `cehrx.data.decode.token_seconds`) pass `max_days` (the crossing token is
  included). The reason is `Samples.stop`.
- **Shrinking batch, refilled.** Finished rows leave the batch (cache, states) once at least
  1/8 of it has finished, and once a quarter of it is free (and the running rows have generated
  at most `REFILL_MAX_WINDOW` tokens) the next rows' prompts are prefilled and join it.
  Zero-shot futures mostly stop within a few tokens while a few run long; without refill every
  batch would end in a long tail of nearly empty forwards.
- **Grammar.** With `cfg.constrained`, every step masks what the token grammar forbids in each
  row's state (`cehrx.generate.constraints.Grammar`), starting from the state the prompt ends
  in. A sample that ends with `[END]`/`[DEATH]` is then always valid for `check_sequence`; one
  cut by a budget may end inside a visit (cut it at its last `[VE]`).
- **Watched tokens.** With `watch_ids`, every step also records the probability that the token
  it draws is one of them (under the distribution it draws from): `Samples.watch_prob`, one
  number per generated token. Zero-shot's hazard estimator (`cehrx.zeroshot.predict`) sums
  these instead of counting the outcome tokens that happened to be drawn.
- **Reproducible whatever the batching.** The uniform number behind each draw is a hash of
  `(cfg.seed, prompt id, sample, step)` (`cehrx.generate.draws.row_uniforms`), so the same
  inputs and seed give the same samples for any `batch_size`, with or without the cache (up
  to float rounding on other devices), and in one call or split over several (`prompt_ids`).

Everything runs under `torch.inference_mode()` with the model in eval mode (restored after).
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor

from cehrx.data.decode import token_seconds
from cehrx.data.vocab import DEATH, END, Vocab
from cehrx.errors import CehrxError
from cehrx.generate.constraints import Grammar
from cehrx.generate.draws import row_uniforms, sample_next
from cehrx.model.kv_cache import KVCache, SharedPrefixKVCache, compaction_order
from cehrx.model.transformer import GPT

__all__ = [
    "STOP_DEATH",
    "STOP_END",
    "STOP_NAMES",
    "STOP_TIME",
    "STOP_TOKENS",
    "Samples",
    "SamplingConfig",
    "sample",
    "sample_next",
]

STOP_END, STOP_DEATH, STOP_TOKENS, STOP_TIME = 0, 1, 2, 3
STOP_NAMES = ("end", "death", "tokens", "time")
_RUNNING = -1
COMPACT_FRACTION = 8  # drop finished rows once >= 1/8 of the batch has finished
REFILL_FRACTION = 4  # admit new prompts once >= 1/4 of the batch is free ...
REFILL_MAX_WINDOW = 64  # ... and the running rows' generated part is at most this long (see _run_stream)
PREFILL_TOKENS = 1024  # padded prompt tokens per prefill forward (see _prefill)
SPARSE_HEAD_MIN_ROWS = (
    256  # off CPU, batches from this size score each grammar state's allowed tokens only (see _draw_step)
)
SPARE_PROMPTS = (
    3  # a batch's prompt buffer has room for this many times its first prompts' count more (joining prompts go there)
)


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

    tokens: (
        np.ndarray
    )  # int32 flat: generated tokens only (prompt excluded); the stop token or the crossing time token included
    offsets: np.ndarray  # int64 [n+1]
    stop: np.ndarray  # int8 [n] STOP_* reason
    elapsed_days: np.ndarray  # float64 [n] days advanced by generated time tokens (incl. the crossing one)
    prompt_index: np.ndarray  # int64 [n] which prompt each sample continues
    watch_prob: np.ndarray | None = (
        None  # float32 like tokens: P(the step's draw is a watched token) (`watch_ids`), else None
    )

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
    max_seq_len: int
    watch: Tensor | None = None  # bool [V]: the tokens whose probability each step records (`watch_ids`)
    state_heads: dict = field(
        default_factory=dict
    )  # grammar state -> (allowed ids, their lm-head rows, which are watched, any watched), built on first use


@dataclass
class _Live:
    """The rows in the batch, one entry each (finished rows ride along until compaction)."""

    row: Tensor  # int64 global row id (prompt * num_samples + sample)
    key: Tensor  # int64 the row's random-number key (prompt id * num_samples + sample)
    plen: Tensor  # int64 prompt length
    n: Tensor  # int64 tokens drawn so far
    secs: Tensor  # int64 seconds advanced by drawn time tokens
    state: Tensor | None  # int64 grammar state
    alive: Tensor  # bool: still sampling

    def select(self, index: Tensor) -> _Live:
        return _Live(*(None if t is None else t[index] for t in self._fields()))

    def cat(self, other: _Live) -> _Live:
        return _Live(*(None if a is None else torch.cat((a, b)) for a, b in zip(self._fields(), other._fields())))

    def _fields(self) -> tuple:
        return self.row, self.key, self.plen, self.n, self.secs, self.state, self.alive


class _Record:
    """What the rows drew and why they stopped, gathered into `Samples` at the end."""

    def __init__(self, n_rows: int, device: torch.device, watch: bool = False) -> None:
        self.watch = watch
        self.stop = torch.full((n_rows,), _RUNNING, dtype=torch.int8, device=device)
        self.n_out = torch.zeros(n_rows, dtype=torch.int64, device=device)
        self.secs = torch.zeros(n_rows, dtype=torch.int64, device=device)
        self.drawn: list[tuple[Tensor, Tensor, Tensor]] = []  # per step: (rows, index within the row, token)
        self.watched: list[Tensor] = []  # per step (with watch_ids): P(watched token) per row

    def settle(self, live: _Live, tok: Tensor, reason: Tensor, bar, watch_p: Tensor | None = None) -> int:
        """Keep this step's tokens; record the rows that just stopped. Returns how many did."""
        self.drawn.append((live.row, live.n - 1, tok))
        if watch_p is not None:
            self.watched.append(watch_p)
        finished = live.alive & (reason != _RUNNING)
        n_fin = int(finished.sum())  # the one host sync per step
        if n_fin:
            rows = live.row[finished]
            self.stop[rows] = reason[finished].to(torch.int8)
            self.n_out[rows] = live.n[finished]
            self.secs[rows] = live.secs[finished]
            live.alive = live.alive & ~finished
            if bar is not None:
                bar.update(n_fin)
        return n_fin

    def samples(self, n_prompts: int, num_samples: int) -> Samples:
        """Flat tokens in row order (vectorised); tokens a finished row drew while riding along are dropped."""
        n_out = self.n_out.cpu().numpy()
        offsets = np.concatenate([[0], np.cumsum(n_out)]).astype(np.int64)
        tokens = np.zeros(int(offsets[-1]), dtype=np.int32)
        watch = np.zeros(int(offsets[-1]), dtype=np.float32) if self.watch else None
        if self.drawn:
            rows, k, tok = (torch.cat(parts).cpu().numpy() for parts in zip(*self.drawn))
            keep = k < n_out[rows]
            tokens[offsets[rows[keep]] + k[keep]] = tok[keep]
            if watch is not None:
                watch[offsets[rows[keep]] + k[keep]] = torch.cat(self.watched).float().cpu().numpy()[keep]
        return Samples(
            tokens=tokens,
            offsets=offsets,
            stop=self.stop.cpu().numpy(),
            elapsed_days=self.secs.cpu().numpy() / 86400.0,
            prompt_index=np.repeat(np.arange(n_prompts, dtype=np.int64), num_samples),
            watch_prob=watch,
        )


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
    prompt_ids: np.ndarray | None = None,
    watch_ids: Sequence[int] | None = None,
) -> Samples:
    """Continue each prompt `num_samples` times (prompt-major output, see the module doc).

    `prompt_tokens`/`prompt_offsets` are flat (prompt i is `tokens[offsets[i]:offsets[i+1]]`,
    at least one token, at most `max_seq_len - 1`). `use_cache=False` recomputes the whole
    prefix at every step (the reference the cache is tested and benchmarked against; the same
    samples for the same seed). `stop_ids` overrides the stop tokens (default `[END]` and
    `[DEATH]`; `()` runs every row to its budget, as the benchmark does). A row's random numbers
    depend on the seed, its prompt's id (`prompt_ids`, default `0..n-1`) and its sample index
    only: a caller that splits its prompts over several calls and passes their global ids gets
    the samples of one call. `watch_ids`: record each step's probability of drawing one of these
    tokens (`Samples.watch_prob`; temperature and grammar applied, top-k/top-p not).
    """
    if num_samples < 1:
        raise CehrxError(f"num_samples must be >= 1, got {num_samples}")
    tokens = np.asarray(prompt_tokens, dtype=np.int64)
    offsets = np.asarray(prompt_offsets, dtype=np.int64)
    lengths = _check_prompts(model, vocab, tokens, offsets)
    prep = _prepare(model, vocab, cfg, stop_ids, watch_ids)
    n_prompts = len(lengths)
    keys = np.arange(n_prompts, dtype=np.int64) if prompt_ids is None else np.asarray(prompt_ids, dtype=np.int64)
    if keys.shape != (n_prompts,):
        raise CehrxError(f"prompt_ids must hold one id per prompt ({n_prompts}), got shape {keys.shape}")
    init_state = (
        prep.grammar.prompt_states(tokens, offsets) if prep.grammar is not None else np.zeros(n_prompts, np.int64)
    )
    if prep.grammar is not None and prep.grammar.is_free(init_state).any():
        import warnings

        bad = np.flatnonzero(prep.grammar.is_free(init_state))
        warnings.warn(
            f"{len(bad)} prompt(s) break the token grammar (first: prompt {bad[0]}); they are sampled unconstrained",
            stacklevel=2,
        )

    # rows longest prompt first: prompts of similar length share a prefill and pad little, and
    # prompts joining a running batch are never wider than its cached prefix
    order = np.argsort(-lengths, kind="stable")
    rows = (order[:, None] * num_samples + np.arange(num_samples)[None, :]).reshape(-1)
    record = _Record(n_prompts * num_samples, prep.device, watch=prep.watch is not None)
    bar = _progress(progress, len(rows))
    was_training = model.training
    model.eval()
    try:
        with torch.inference_mode():
            if use_cache:
                _run_stream(model, prep, cfg, tokens, offsets, rows, num_samples, init_state, keys, record, bar)
            else:
                for start in range(0, len(rows), cfg.batch_size):
                    _run_recompute(
                        model,
                        prep,
                        cfg,
                        tokens,
                        offsets,
                        rows[start : start + cfg.batch_size],
                        num_samples,
                        init_state,
                        keys,
                        record,
                        bar,
                    )
    finally:
        model.train(was_training)
        if bar is not None:
            bar.close()
    return record.samples(n_prompts, num_samples)


def _check_prompts(model: GPT, vocab: Vocab, tokens: np.ndarray, offsets: np.ndarray) -> np.ndarray:
    if offsets.ndim != 1 or len(offsets) < 1 or offsets[0] != 0 or offsets[-1] != len(tokens):
        raise CehrxError(f"prompt_offsets must start at 0 and end at len(prompt_tokens)={len(tokens)}")
    lengths = np.diff(offsets)
    if (lengths < 1).any():
        raise CehrxError(
            f"prompt {int(np.flatnonzero(lengths < 1)[0])} is empty: every prompt needs at least its demographic tokens"
        )
    limit = model.config.max_seq_len - 1
    if len(lengths) and lengths.max() > limit:
        raise CehrxError(
            f"prompt {int(lengths.argmax())} has {int(lengths.max())} tokens; the model's context (max_seq_len={model.config.max_seq_len}) "
            f"leaves room for {limit}: cut histories shorter"
        )
    if len(tokens) and (tokens.min() < 0 or tokens.max() >= len(vocab)):
        raise CehrxError(
            f"prompt token ids must be in [0, {len(vocab)}) (the model's vocab.json), got {int(tokens.min())}..{int(tokens.max())}"
        )
    if model.config.vocab_size != len(vocab):
        raise CehrxError(
            f"the model has vocab_size={model.config.vocab_size} but the vocabulary has {len(vocab)} tokens: use the vocab.json saved with the model"
        )
    return lengths


_TABLES: list = [None, None, None]  # (vocab, device, (grammar, forbidden, seconds)) of the last call


def _vocab_tables(vocab: Vocab, device: torch.device) -> tuple[Grammar, Tensor, Tensor]:
    """The grammar, its forbidden-token table and each token's seconds, kept for the next call
    with the same vocabulary object (callers that sample patient by patient pay them once)."""
    if _TABLES[0] is not vocab or _TABLES[1] != device:
        grammar = Grammar.build(vocab).to(device)
        _TABLES[:] = [vocab, device, (grammar, ~grammar.allowed, torch.from_numpy(token_seconds(vocab)).to(device))]
    return _TABLES[2]


def _prepare(
    model: GPT,
    vocab: Vocab,
    cfg: SamplingConfig,
    stop_ids: Sequence[int] | None,
    watch_ids: Sequence[int] | None = None,
) -> _Prepared:
    device = model.wte.weight.device
    watch = None
    if watch_ids is not None:
        watch = torch.zeros(len(vocab), dtype=torch.bool, device=device)
        watch[torch.as_tensor(np.asarray(watch_ids, dtype=np.int64), device=device)] = True
    stops = [vocab[END], vocab[DEATH]] if stop_ids is None else list(stop_ids)
    grammar, forbidden, seconds = _vocab_tables(vocab, device)
    return _Prepared(
        device=device,
        grammar=grammar if cfg.constrained else None,
        forbidden=forbidden if cfg.constrained else None,
        pad_id=vocab.pad_id,
        seconds=seconds,
        stop_ids=torch.tensor(stops, dtype=torch.int64, device=device),
        end_id=vocab[END],
        death_id=vocab[DEATH],
        max_seconds=math.inf if cfg.max_days is None else float(cfg.max_days) * 86400.0,
        cache_dtype=torch.get_autocast_dtype(device.type)
        if torch.is_autocast_enabled(device.type)
        else model.wte.weight.dtype,
        max_seq_len=model.config.max_seq_len,
        watch=watch,
    )


def _progress(enabled: bool, total: int):
    if not enabled:
        return None
    from tqdm.auto import tqdm

    return tqdm(total=total, unit="seq", desc="sampling", dynamic_ncols=True)


def _left_pad(
    tokens: np.ndarray, offsets: np.ndarray, prompts: np.ndarray, width: int, pad_id: int
) -> tuple[np.ndarray, np.ndarray]:
    """`[P, width]` ids, left-padded, and the bool mask of real tokens (vectorised)."""
    lengths = offsets[prompts + 1] - offsets[prompts]
    col = np.arange(width)[None, :]
    start = width - lengths[:, None]
    real = col >= start
    src = offsets[prompts][:, None] + (col - start)
    ids = np.where(real, tokens[np.where(real, src, 0)], pad_id)
    return ids, real


def _new_live(
    prep: _Prepared, rows: np.ndarray, plen: np.ndarray, init_state: np.ndarray, keys: np.ndarray, num_samples: int
) -> _Live:
    dev = prep.device
    state = torch.from_numpy(init_state[rows // num_samples]).to(dev) if prep.grammar is not None else None
    zeros = torch.zeros(len(rows), dtype=torch.int64, device=dev)
    key = torch.from_numpy(keys[rows // num_samples] * num_samples + rows % num_samples).to(dev)
    return _Live(
        torch.from_numpy(rows).to(dev),
        key,
        torch.from_numpy(plen).to(dev),
        zeros,
        zeros.clone(),
        state,
        torch.ones(len(rows), dtype=torch.bool, device=dev),
    )


def _draw_step(
    prep: _Prepared, cfg: SamplingConfig, model: GPT, hidden: Tensor, live: _Live
) -> tuple[Tensor, Tensor, Tensor | None]:
    """Score the next token from each row's last hidden state, mask what the grammar forbids,
    draw one token per row, advance the rows; (tokens, STOP_* or _RUNNING, P(watched) or None).

    With the grammar on, the lm head runs per grammar state on that state's allowed tokens only
    (`_draw_by_state`): a zero-shot state allows a fifth of the vocabulary on average (a time
    token after a visit, a code inside one), so most of the head's matmul and of the softmax and
    cumulative sum over the vocabulary are skipped. The draws are the same as from the masked
    full distribution, up to float rounding. On CPU this is faster at every batch size measured
    (20 to 1024 rows); on GPU, where a few small matmuls cost more launches than one large one,
    it is used from `SPARSE_HEAD_MIN_ROWS` rows.
    """
    u = row_uniforms(cfg.seed, live.key, live.n)
    if live.state is not None and _score_by_state(hidden):
        tok, watch_p = _draw_by_state(prep, cfg, model, hidden, live.state, u)
    else:
        logits = model.lm_head_logits(hidden).float()
        if live.state is not None:
            logits.masked_fill_(prep.forbidden[live.state], float("-inf"))
        else:
            logits[:, prep.pad_id] = float("-inf")
        tok = sample_next(logits, cfg.temperature, cfg.top_k, cfg.top_p, uniform=u)
        watch_p = (
            None if prep.watch is None else _watched_mass(logits, prep.watch, tok, prep.watch[tok], cfg.temperature)
        )
    live.n = live.n + 1
    live.secs = live.secs + prep.seconds[tok]
    if live.state is not None:
        live.state = prep.grammar.step(live.state, tok)
    return (
        tok,
        _stop_reason(prep, tok, live.secs, (live.plen + live.n >= prep.max_seq_len) | (live.n >= cfg.max_new_tokens)),
        watch_p,
    )


def _watched_mass(logits: Tensor, watch: Tensor, tok: Tensor, drawn_watched: Tensor, temperature: float) -> Tensor:
    """P(the draw is a watched token) per row from (masked) logits: a ratio of two logsumexps.
    Greedy decoding (temperature 0) draws its argmax with certainty: 1 if it is watched, else 0."""
    if temperature == 0:
        return drawn_watched.float()
    if not bool(watch.any()):
        return torch.zeros(len(logits), device=logits.device)
    z = logits / temperature
    return torch.exp(torch.logsumexp(z[:, watch], dim=-1) - torch.logsumexp(z, dim=-1)).nan_to_num(0.0)


def _score_by_state(hidden: Tensor) -> bool:
    return hidden.device.type == "cpu" or len(hidden) >= SPARSE_HEAD_MIN_ROWS


def _draw_by_state(
    prep: _Prepared, cfg: SamplingConfig, model: GPT, hidden: Tensor, state: Tensor, u: Tensor
) -> tuple[Tensor, Tensor | None]:
    """One token per row, the rows grouped by grammar state, each group scored on its state's allowed
    tokens; with watched tokens also each row's probability of drawing one."""
    states, group = torch.unique(state, return_inverse=True)
    rows_by_group = torch.split(
        torch.argsort(group, stable=True), torch.bincount(group, minlength=len(states)).tolist()
    )
    tok = torch.empty(len(state), dtype=torch.int64, device=state.device)
    watch_p = None if prep.watch is None else torch.zeros(len(state), device=state.device)
    for s, rows in zip(states.tolist(), rows_by_group):
        if s not in prep.state_heads:
            ids = torch.nonzero(~prep.forbidden[s])[:, 0]
            w = None if prep.watch is None else prep.watch[ids]  # the state's allowed tokens that are watched
            prep.state_heads[s] = (ids, model.lm_head.weight.index_select(0, ids), w, w is not None and bool(w.any()))
        ids, weight, w, any_watched = prep.state_heads[s]
        logits = F.linear(hidden.index_select(0, rows), weight).float()
        drawn = sample_next(logits, cfg.temperature, cfg.top_k, cfg.top_p, uniform=u[rows])
        tok[rows] = ids[drawn]
        if watch_p is not None and any_watched:  # a state that allows no watched token leaves its rows at 0
            watch_p[rows] = _watched_mass(logits, w, drawn, w[drawn], cfg.temperature)
    return tok, watch_p


def _prefill(
    model: GPT,
    prep: _Prepared,
    tokens: np.ndarray,
    offsets: np.ndarray,
    rows: np.ndarray,
    num_samples: int,
    init_state: np.ndarray,
    keys: np.ndarray,
    into: SharedPrefixKVCache | None = None,
    refilled: bool = False,
    budget: int = 16,
) -> tuple[SharedPrefixKVCache, Tensor, _Live]:
    """Run each distinct prompt of `rows` once (left-padded, lm head on the last column only);
    its samples then share its cached keys instead of one copy per sample.

    Prompts run longest first in forwards of about `PREFILL_TOKENS` padded tokens, each written
    right-aligned into one prompt buffer: one forward over hundreds of histories is slower on CPU
    than several (its activations fall out of cache) and pads short prompts to the longest.
    The buffer is a new cache's, or the running cache `into`'s, which the new prompts and rows
    then join: their keys are written once, where they are read. A new batch that other rows
    will join (`refilled`) gets room for them up front: `SPARE_PROMPTS` times as many prompts
    and, on CPU, generated columns for the token `budget` plus the refill window. Untouched
    pages cost nothing, while growing a large buffer means a fresh allocation whose every page
    faults on first write (tens of ms per step on a VM); GPU buffers start small and double."""
    row_prompt = rows // num_samples
    uniq, inverse = np.unique(row_prompt, return_inverse=True)
    lengths = offsets[uniq + 1] - offsets[uniq]
    order = np.argsort(-lengths, kind="stable")  # prompt buffer row i holds prompt uniq[order[i]]
    uniq, lengths = uniq[order], lengths[order]
    width = int(lengths[0])
    if into is None:
        spare = SPARE_PROMPTS if refilled and num_samples > 1 else 0
        target = model.new_kv_cache(len(uniq) * (1 + spare), width, dtype=prep.cache_dtype)
    else:
        target = into.reserve_prompts(len(uniq), width)
    last = _prefill_chunked(model, prep, tokens, offsets, uniq, lengths, target)
    rank = np.empty_like(order)
    rank[order] = np.arange(len(order))
    idx = torch.from_numpy(rank[inverse]).to(prep.device)
    hidden = last[idx]
    slot = torch.from_numpy(rows % num_samples).to(prep.device)
    plen = torch.from_numpy(lengths).to(prep.device)
    if into is None:
        target.advance(width)
        real = torch.arange(width, device=prep.device)[None, :] >= width - plen[:, None]
        padded = not bool(real.all())  # equal-length prompts (generate) need no key mask at all
        capacity = budget + REFILL_MAX_WINDOW + 1 if refilled and prep.device.type == "cpu" else 16
        into = SharedPrefixKVCache(
            target, real if padded else None, idx, slot, num_samples, n_prompts=len(uniq), capacity=capacity
        )
    else:
        into.join(plen, idx, slot)
    return into, hidden, _new_live(prep, rows, lengths[rank[inverse]], init_state, keys, num_samples)


def _prefill_chunked(
    model: GPT,
    prep: _Prepared,
    tokens: np.ndarray,
    offsets: np.ndarray,
    prompts: np.ndarray,
    lengths: np.ndarray,
    target: KVCache,
) -> Tensor:
    """Prefill `prompts` (sorted longest first, `lengths` tokens) into rows `0..len-1` of `target`,
    right-aligned, `PREFILL_TOKENS` at a time; each prompt's last hidden state `[P, n_embd]`."""
    last = []
    for a, b in _prefill_chunks(lengths, PREFILL_TOKENS):
        w = int(lengths[a])
        ids_np, real_np = _left_pad(tokens, offsets, prompts[a:b], w, 0)
        ids, kmask = torch.from_numpy(ids_np).to(prep.device), torch.from_numpy(real_np).to(prep.device)
        h = model(
            ids,
            position_ids=(torch.cumsum(kmask, dim=1) - 1).clamp_min(0),
            kv_cache=target.window(slice(a, b), w),
            key_mask=kmask if not real_np[:, 0].all() else None,
        )
        last.append(h[:, -1])
    return torch.cat(last)


def _prefill_chunks(lengths: np.ndarray, budget: int) -> list[tuple[int, int]]:
    """Split prompts sorted longest first into runs `[a, b)` of at most `budget` padded tokens
    (`(b - a) * lengths[a]`; a prompt longer than the budget runs alone).

    >>> _prefill_chunks(np.array([300, 200, 200, 100, 100, 100]), 600)
    [(0, 2), (2, 5), (5, 6)]
    """
    chunks, a = [], 0
    while a < len(lengths):
        b = a + max(1, budget // int(lengths[a]))
        chunks.append((a, min(b, len(lengths))))
        a = b
    return chunks


def _run_stream(
    model: GPT,
    prep: _Prepared,
    cfg: SamplingConfig,
    tokens: np.ndarray,
    offsets: np.ndarray,
    rows: np.ndarray,
    num_samples: int,
    init_state: np.ndarray,
    keys: np.ndarray,
    record: _Record,
    bar,
) -> None:
    """Sample every row with the KV cache, `cfg.batch_size` rows at a time, refilling as rows stop.

    Rows enter in `rows` order: whenever a quarter of the batch is free, the next rows' prompts
    are prefilled and join the running batch, so the long tail of a few slow futures runs
    alongside new work instead of in nearly empty forwards. Finished rows leave at the next
    compaction (>= 1/8 of the batch finished). Joining rows attend over the columns the running
    rows have generated so far (masked for them), so rows join only while that part is short
    (`REFILL_MAX_WINDOW`): zero-shot futures mostly stop within a few tokens and refill often;
    long generated patients run in waves, as they would without refill.
    """
    cache: SharedPrefixKVCache | None = None
    live: _Live | None = None
    hidden = None  # each row's last hidden state (what its next token is drawn from)
    n_alive, nxt = 0, 0
    while True:
        in_batch = 0 if live is None else len(live.row)
        free = cfg.batch_size - in_batch
        if nxt < len(rows) and (
            n_alive == 0
            or (free * REFILL_FRACTION >= cfg.batch_size and not cache.folded and cache.length <= REFILL_MAX_WINDOW)
        ):
            if n_alive == 0:
                cache = live = hidden = None
                free = cfg.batch_size
            take = rows[nxt : nxt + free]
            nxt += len(take)
            cache, new_hidden, new_live = _prefill(
                model,
                prep,
                tokens,
                offsets,
                take,
                num_samples,
                init_state,
                keys,
                into=cache,
                refilled=nxt < len(rows),
                budget=min(cfg.max_new_tokens, prep.max_seq_len),
            )
            if live is None:
                hidden, live = new_hidden, new_live
            else:
                hidden, live = torch.cat((hidden, new_hidden)), live.cat(new_live)
            n_alive += len(take)
        if n_alive == 0:
            return
        tok, reason, watch_p = _draw_step(prep, cfg, model, hidden, live)
        n_fin = record.settle(live, tok, reason, bar, watch_p)
        n_alive -= n_fin
        if n_alive == 0:
            continue  # everything stopped: the next round admits new rows or returns
        if n_fin and (len(live.row) - n_alive) * COMPACT_FRACTION >= len(live.row):
            keep = compaction_order(live.alive)  # few rows move: the cache copies only those
            live, tok = live.select(keep), tok[keep]
            cache.select_rows(keep)
        # rows riding along after a full context would step past the rotary table: clamp (their output is discarded)
        pos = (live.plen + live.n - 1).clamp_max(prep.max_seq_len - 1)[:, None]
        h = model(tok[:, None], position_ids=pos, kv_cache=cache)
        hidden = h[:, -1]


def _run_recompute(
    model: GPT,
    prep: _Prepared,
    cfg: SamplingConfig,
    tokens: np.ndarray,
    offsets: np.ndarray,
    rows: np.ndarray,
    num_samples: int,
    init_state: np.ndarray,
    keys: np.ndarray,
    record: _Record,
    bar,
) -> None:
    """The cache-free reference: one fixed batch, the whole left-padded sequence recomputed every step."""
    row_prompt = rows // num_samples
    lengths = offsets[row_prompt + 1] - offsets[row_prompt]
    width = int(lengths.max())
    max_new = min(cfg.max_new_tokens, prep.max_seq_len - int(lengths.min()))
    ids_np, real_np = _left_pad(tokens, offsets, row_prompt, width, 0)
    seq = torch.zeros(len(rows), width + max_new, dtype=torch.int64, device=prep.device)
    key_mask = torch.zeros_like(seq, dtype=torch.bool)
    seq[:, :width], key_mask[:, :width] = torch.from_numpy(ids_np), torch.from_numpy(real_np)
    live = _new_live(prep, rows, lengths, init_state, keys, num_samples)
    n_alive = len(rows)
    for step in range(max_new):
        kmask = key_mask[:, : width + step]
        pos = (torch.cumsum(kmask, dim=1) - 1).clamp(0, prep.max_seq_len - 1)
        hidden = model(seq[:, : width + step], position_ids=pos, key_mask=kmask)[:, -1]
        tok, reason, watch_p = _draw_step(prep, cfg, model, hidden, live)
        n_alive -= record.settle(live, tok, reason, bar, watch_p)
        if n_alive == 0:
            return
        seq[:, width + step], key_mask[:, width + step] = tok, True


def _stop_reason(prep: _Prepared, tok: Tensor, secs: Tensor, out_of_room: Tensor) -> Tensor:
    """STOP_* per row for the token just drawn, or _RUNNING. Precedence: [END]/[DEATH], then
    the time budget, then the token budget / full context (`out_of_room`)."""
    reason = torch.where(out_of_room, STOP_TOKENS, _RUNNING)
    reason = torch.where(secs > prep.max_seconds, STOP_TIME, reason)
    is_stop = torch.isin(tok, prep.stop_ids)
    return torch.where(is_stop, torch.where(tok == prep.death_id, STOP_DEATH, STOP_END), reason)
