"""Batched autoregressive sampling with a KV cache: the engine of `generate` and `zeroshot`.

`Engine(model, vocab, cfg)` owns what stays fixed across calls: the model, the grammar tables
(`cehrx.sampling.constraints.Grammar`) and each token's seconds on the model's device, the stop
and watched tokens, the sampling settings (`SamplingConfig`) and the lm-head rows of each grammar
state. `engine.sample(prompt_tokens, prompt_offsets, num_samples=...)` continues every prompt
`num_samples` times and returns the continuations as flat arrays (`Samples`); `with_settings`
gives an engine with other settings (a seed, a time budget) sharing those tables. One call's KV
cache and per-row state live in `cehrx.sampling.stream.Stream` and `cehrx.sampling.rows`.

How a run is organised (and why):

- **A stream of rows.** Every `(prompt, sample)` pair is a row; row `i * num_samples + j` is
  sample `j` of prompt `i` (results come back in that prompt-major order). Rows enter the batch
  longest prompt first, at most `cfg.batch_size` at a time, so prompts of similar length share
  a prefill and pad little (zero-shot histories range from a few to thousands of tokens).
- **Prefill once, share the keys.** Entering prompts run longest first, left-padded, in
  forwards of about `stream.PREFILL_TOKENS` tokens, written straight into the batch's prompt
  buffer; `key_mask` hides the padding keys and per-row `position_ids` start each sequence at 0,
  so a padded prompt gets exactly the logits it gets alone. Its samples then read its cached keys
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
  at most `stream.REFILL_MAX_WINDOW` tokens) the next rows' prompts are prefilled and join it.
  Zero-shot futures mostly stop within a few tokens while a few run long; without refill every
  batch would end in a long tail of nearly empty forwards.
- **Grammar.** With `cfg.constrained`, every step masks what the token grammar forbids in each
  row's state, starting from the state the prompt ends in. A sample that ends with
  `[END]`/`[DEATH]` is then always valid for `check_sequence`; one cut by a budget may end
  inside a visit (cut it at its last `[VE]`).
- **Watched tokens.** With `watch_ids`, every step also records the probability that the token
  it draws is one of them (under the distribution it draws from): `Samples.watch_prob`, one
  number per generated token. Zero-shot's hazard estimator (`cehrx.zeroshot.score`) sums
  these instead of counting the outcome tokens that happened to be drawn.
- **Forbidden tokens.** With `forbid_ids`, `sample(forbid_when=...)` asks at every step which
  rows may not draw them (`forbid_when(rows)`, bool per row, from the engine-owned `Rows`: the
  seconds and visits drawn so far, the tokens drawn, the row's prompt). Those rows draw from the
  distribution renormalised over the other tokens their grammar state allows; a row whose state
  allows nothing else draws unmasked (it can only draw a forbidden token). The watched
  probability is always that of the unmasked distribution: zero-shot's REACH estimator
  (`cehrx.zeroshot.reach`) forbids the outcome inside its window and multiplies the
  probabilities of not drawing it.
- **Control expectations.** With `control_basis` (a `[V, K]` matrix: K numbers per token), every
  step also records the expectation of the drawn token's row, `sum_v p_t(v) basis[v]`, under the
  distribution it draws from (`Samples.control_mean`, K numbers per generated token). The drawn
  row minus it has mean zero given the past: zero-shot's control variates
  (`cehrx.zeroshot.controls`) sum these martingale steps along a future.
- **Reproducible whatever the batching.** The uniform number behind each draw is a hash of
  `(cfg.seed, prompt id, sample, step)` (`cehrx.sampling.draws.row_uniforms`), so the same
  inputs and seed give the same samples for any `batch_size`, with or without the cache (up
  to float rounding on other devices), and in one call or split over several (`prompt_ids`).

Everything runs under `torch.inference_mode()` with the model in eval mode (restored after).
"""

from __future__ import annotations

import copy
import math
import warnings
from collections.abc import Callable, Sequence
from typing import Any, NamedTuple

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor

from cehrx.data.decode import token_seconds
from cehrx.data.vocab import DEATH, END, VS, Vocab
from cehrx.errors import CehrxError
from cehrx.model.transformer import GPT
from cehrx.sampling.config import SamplingConfig
from cehrx.sampling.constraints import Grammar
from cehrx.sampling.draws import row_uniforms, sample_next
from cehrx.sampling.rows import RUNNING, Prompts, Record, Rows
from cehrx.sampling.samples import STOP_DEATH, STOP_END, STOP_TIME, STOP_TOKENS, Samples
from cehrx.sampling.stream import Stream, recompute

__all__ = ["Engine", "ForbidWhen"]

# which rows of the batch may not draw the engine's `forbid_ids` at this step (bool [B]); see `Engine.sample`
ForbidWhen = Callable[[Rows], Tensor]

# off CPU, batches from this size score each grammar state's allowed tokens only (see `Engine.draw`)
SPARSE_HEAD_MIN_ROWS = 256


class Engine:
    """A model, its vocabulary's grammar and stop tokens, and sampling settings, ready to sample.

    `stop_ids` overrides the stop tokens (default `[END]` and `[DEATH]`; `()` runs every row to
    its budget, as the benchmark does). `watch_ids`: record each step's probability of drawing one
    of these tokens (`Samples.watch_prob`; temperature and grammar applied, top-k/top-p and
    forbidding not). `forbid_ids`: the tokens `sample(forbid_when=...)` may forbid. `control_basis`
    (`[V, K]`): record each step's expected basis row under the distribution drawn from
    (`Samples.control_mean`; needs untruncated sampling: temperature > 0, no top-k/top-p).
    """

    def __init__(
        self,
        model: GPT,
        vocab: Vocab,
        cfg: SamplingConfig | None = None,
        *,
        stop_ids: Sequence[int] | None = None,
        watch_ids: Sequence[int] | np.ndarray | None = None,
        forbid_ids: Sequence[int] | np.ndarray | None = None,
        control_basis: np.ndarray | Tensor | None = None,
    ) -> None:
        self.model, self.vocab = model, vocab
        self.cfg = cfg if cfg is not None else SamplingConfig()
        self.device = dev = model.wte.weight.device
        self.max_seq_len = model.config.max_seq_len
        self.host_grammar = Grammar.build(vocab)  # on the CPU: prompt states are found with numpy
        self.grammar = self.host_grammar.to(dev)
        self.forbidden = ~self.grammar.allowed  # bool [n_states, V]: one gather per step
        self.seconds = torch.from_numpy(token_seconds(vocab)).to(dev)  # int64 [V] seconds each token advances
        stops = [vocab[END], vocab[DEATH]] if stop_ids is None else list(stop_ids)
        self.stop_ids = torch.tensor(stops, dtype=torch.int64, device=dev)
        self.death_id, self.pad_id, self.vs_id = vocab[DEATH], vocab.pad_id, vocab[VS]
        self.watch = self._token_set(watch_ids)  # bool [V]: the tokens whose probability each step records
        self.forbid = self._token_set(forbid_ids)  # bool [V]: the tokens `forbid_when` may forbid
        self.control = self._control_basis(control_basis)  # float32 [V, K]: rows whose expectation each step records
        # bool [n_states]: the states that allow forbidden tokens only (a row there draws unmasked)
        self.only_forbidden = None if self.forbid is None else ~(self.grammar.allowed & ~self.forbid).any(1)
        self.state_heads: dict[int, _Head] = {}  # grammar state -> its lm-head rows and token sets, built on first use

    def _token_set(self, ids: Sequence[int] | np.ndarray | None) -> Tensor | None:
        if ids is None:
            return None
        out = torch.zeros(len(self.vocab), dtype=torch.bool, device=self.device)
        out[torch.as_tensor(np.asarray(ids, dtype=np.int64), device=self.device)] = True
        return out

    def _control_basis(self, basis: np.ndarray | Tensor | None) -> Tensor | None:
        if basis is None:
            return None
        b = torch.as_tensor(np.asarray(basis, dtype=np.float32)).to(self.device)
        if b.ndim != 2 or b.shape[0] != len(self.vocab):
            raise CehrxError(f"control_basis must be [vocab size = {len(self.vocab)}, K], got {tuple(b.shape)}")
        if not self.cfg.untruncated:
            raise CehrxError(
                "control_basis needs the model's own distribution: sampling.temperature > 0, top_k=0, top_p=1"
            )
        return b

    def with_settings(self, **changes: Any) -> Engine:
        """This engine with other sampling settings (`seed=...`, `max_days=...`), sharing its tables."""
        other = copy.copy(self)
        other.cfg = self.cfg.replace(**changes)
        return other

    @property
    def constrained(self) -> bool:
        return self.cfg.constrained

    @property
    def max_new(self) -> int:
        """The token budget per row (`max_new_tokens`, or the context when None)."""
        return self.max_seq_len if self.cfg.max_new_tokens is None else int(self.cfg.max_new_tokens)

    @property
    def max_seconds(self) -> float:
        return math.inf if self.cfg.max_days is None else float(self.cfg.max_days) * 86400.0

    def cache_dtype(self) -> torch.dtype:
        """The keys' dtype: the weights', or autocast's when it is on."""
        t = self.device.type
        return torch.get_autocast_dtype(t) if torch.is_autocast_enabled(t) else self.model.wte.weight.dtype

    def sample(
        self,
        prompt_tokens: np.ndarray,
        prompt_offsets: np.ndarray,
        *,
        num_samples: int = 1,
        prompt_ids: np.ndarray | None = None,
        progress: bool = True,
        use_cache: bool = True,
        forbid_when: ForbidWhen | None = None,
    ) -> Samples:
        """Continue each prompt `num_samples` times (prompt-major output, see the module doc).

        `prompt_tokens`/`prompt_offsets` are flat (prompt i is `tokens[offsets[i]:offsets[i+1]]`,
        at least one token, at most `max_seq_len - 1`). `use_cache=False` recomputes the whole
        prefix at every step (the reference the cache is tested and benchmarked against; the same
        samples for the same seed). A row's random numbers depend on the seed, its prompt's id
        (`prompt_ids`, default `0..n-1`) and its sample index only: a caller that splits its
        prompts over several calls and passes their global ids gets the samples of one call.

        `forbid_when(rows)` (needs `forbid_ids`): before each draw, which rows of the batch may not
        draw the forbidden tokens (module doc). It must read each row's own state only (`Rows`:
        `row // num_samples` is its prompt's index in this call), so that a row's draws do not
        depend on its batch.
        """
        self._check_forbid(forbid_when)
        prompts = self._prompts(prompt_tokens, prompt_offsets, num_samples, prompt_ids)
        lengths = np.diff(prompts.offsets)
        # rows longest prompt first: prompts of similar length share a prefill and pad little, and
        # prompts joining a running batch are never wider than its cached prefix
        order = np.argsort(-lengths, kind="stable")
        rows = (order[:, None] * num_samples + np.arange(num_samples)[None, :]).reshape(-1)
        record = Record(
            len(lengths) * num_samples,
            self.device,
            watch=self.watch is not None,
            controls=0 if self.control is None else self.control.shape[1],
        )
        bar = _progress(progress, len(rows))
        was_training = self.model.training
        self.model.eval()
        try:
            with torch.inference_mode():
                if use_cache:
                    Stream(self, prompts, record, bar, forbid_when).run(rows)
                else:
                    for start in range(0, len(rows), self.cfg.batch_size):
                        recompute(self, prompts, rows[start : start + self.cfg.batch_size], record, bar, forbid_when)
        finally:
            self.model.train(was_training)
            if bar is not None:
                bar.close()
        return record.samples(len(lengths), num_samples)

    def _check_forbid(self, forbid_when: ForbidWhen | None) -> None:
        if forbid_when is None:
            return
        if self.forbid is None:
            raise CehrxError("sample(forbid_when=...) needs an Engine built with forbid_ids (the tokens to forbid)")
        if self.cfg.temperature == 0:
            raise CehrxError(
                "forbidding tokens needs sampling.temperature > 0: a greedy step records no probability to forbid"
            )

    def new_rows(self, rows: np.ndarray, plen: np.ndarray, prompts: Prompts) -> Rows:
        return Rows.start(self.device, rows, plen, prompts, self.constrained)

    def draw(
        self, hidden: Tensor, rows: Rows, forbid_when: ForbidWhen | None = None
    ) -> tuple[Tensor, Tensor, Tensor | None]:
        """Score the next token from each row's last hidden state, mask what the grammar forbids
        (and `forbid_ids` for the rows `forbid_when` names), draw one token per row, advance the
        rows; (tokens, STOP_* or RUNNING, the step's numbers or None: `[B, C]`, P(watched) under the
        unforbidden distribution first when watching, then the K control expectations).

        With the grammar on, the lm head runs per grammar state on that state's allowed tokens only
        (`_draw_by_state`): a zero-shot state allows a fifth of the vocabulary on average (a time
        token after a visit, a code inside one), so most of the head's matmul and of the softmax and
        cumulative sum over the vocabulary are skipped. The draws are the same as from the masked
        full distribution, up to float rounding. On CPU this is faster at every batch size measured
        (20 to 1024 rows); on GPU, where a few small matmuls cost more launches than one large one,
        it is used from `SPARSE_HEAD_MIN_ROWS` rows.
        """
        cfg = self.cfg
        u = row_uniforms(cfg.seed, rows.key, rows.n)
        forbid = self._forbid_rows(rows, forbid_when)
        if rows.state is not None and _score_by_state(hidden):
            tok, stats = self._draw_by_state(hidden, rows.state, u, forbid)
        else:
            logits = self.model.lm_head_logits(hidden).float()
            if rows.state is not None:
                logits.masked_fill_(self.forbidden[rows.state], float("-inf"))
            else:
                logits[:, self.pad_id] = float("-inf")
            masked = logits if forbid is None else logits.masked_fill(forbid[:, None] & self.forbid, float("-inf"))
            tok = sample_next(masked, cfg.temperature, cfg.top_k, cfg.top_p, uniform=u)
            stats = self._step_stats(logits, masked, tok, self.watch, self.control)
        rows.advance(tok, self.seconds, self.grammar, self.vs_id)
        out_of_room = (rows.plen + rows.n >= self.max_seq_len) | (rows.n >= self.max_new)
        return tok, self._stop_reason(tok, rows.secs, out_of_room), stats

    def _step_stats(
        self, logits: Tensor, masked: Tensor, drawn: Tensor, watched: Tensor | None, control: Tensor | None
    ) -> Tensor | None:
        """`[B, C]`: P(watched) (from `logits`, before forbidding), then the control expectations (under
        `masked`, the distribution drawn from); `watched` / `control` over the same columns as the logits."""
        parts = []
        if self.watch is not None:
            if watched is None:  # a state that allows no watched token: 0
                parts.append(torch.zeros(len(logits), 1, device=logits.device))
            else:
                parts.append(_watched_mass(logits, watched, drawn, watched[drawn], self.cfg.temperature)[:, None])
        if control is not None:
            parts.append(torch.softmax(masked / self.cfg.temperature, dim=-1) @ control)
        return torch.cat(parts, dim=1) if parts else None

    def _forbid_rows(self, rows: Rows, forbid_when: ForbidWhen | None) -> Tensor | None:
        """bool [B]: the rows whose draw leaves out `forbid_ids` now (None: no row's). A row whose grammar
        state allows forbidden tokens only is left out of it: it draws unmasked (module doc)."""
        if forbid_when is None:
            return None
        state = rows.state if rows.state is not None else self.host_grammar.free_state()  # free: all but [PAD]
        return forbid_when(rows) & ~self.only_forbidden[state]

    def _draw_by_state(
        self, hidden: Tensor, state: Tensor, u: Tensor, forbid: Tensor | None = None
    ) -> tuple[Tensor, Tensor | None]:
        """One token per row, the rows grouped by grammar state, each group scored on its state's allowed
        tokens (less the forbidden ones for the rows of `forbid`); with watched tokens also each row's
        probability of drawing one before forbidding."""
        cfg = self.cfg
        states, group = torch.unique(state, return_inverse=True)
        rows_by_group = torch.split(
            torch.argsort(group, stable=True), torch.bincount(group, minlength=len(states)).tolist()
        )
        tok = torch.empty(len(state), dtype=torch.int64, device=state.device)
        stats = None
        for s, rows in zip(states.tolist(), rows_by_group):
            h = self._state_head(s)
            logits = F.linear(hidden.index_select(0, rows), h.weight).float()
            masked = logits
            if forbid is not None and h.forbidden is not None:
                masked = logits.masked_fill(forbid[rows][:, None] & h.forbidden, float("-inf"))
            drawn = sample_next(masked, cfg.temperature, cfg.top_k, cfg.top_p, uniform=u[rows])
            tok[rows] = h.ids[drawn]
            group_stats = self._step_stats(logits, masked, drawn, h.watched, h.control)
            if group_stats is not None:
                if stats is None:
                    stats = torch.zeros(len(state), group_stats.shape[1], device=state.device)
                stats[rows] = group_stats
        return tok, stats

    def _state_head(self, s: int) -> _Head:
        if s not in self.state_heads:
            ids = torch.nonzero(~self.forbidden[s])[:, 0]
            w = None if self.watch is None else self.watch[ids]
            f = None if self.forbid is None else self.forbid[ids]
            head = self.model.lm_head.weight.index_select(0, ids)
            any_forbidden = f is not None and bool(f.any())
            control = None if self.control is None else self.control.index_select(0, ids)
            watched = w if w is not None and bool(w.any()) else None  # None: the state allows no watched token
            self.state_heads[s] = _Head(ids, head, watched, f if any_forbidden else None, control)
        return self.state_heads[s]

    def _stop_reason(self, tok: Tensor, secs: Tensor, out_of_room: Tensor) -> Tensor:
        """STOP_* per row for the token just drawn, or RUNNING. Precedence: [END]/[DEATH], then
        the time budget, then the token budget / full context (`out_of_room`)."""
        reason = torch.where(out_of_room, STOP_TOKENS, RUNNING)
        reason = torch.where(secs > self.max_seconds, STOP_TIME, reason)
        is_stop = torch.isin(tok, self.stop_ids)
        return torch.where(is_stop, torch.where(tok == self.death_id, STOP_DEATH, STOP_END), reason)

    def _prompts(
        self, prompt_tokens: np.ndarray, prompt_offsets: np.ndarray, num_samples: int, prompt_ids: np.ndarray | None
    ) -> Prompts:
        """The checked prompts, their global ids and the grammar state each ends in."""
        if num_samples < 1:
            raise CehrxError(f"num_samples must be >= 1, got {num_samples}")
        tokens = np.asarray(prompt_tokens, dtype=np.int64)
        offsets = np.asarray(prompt_offsets, dtype=np.int64)
        n_prompts = len(_check_prompts(self.model, self.vocab, tokens, offsets))
        keys = np.arange(n_prompts, dtype=np.int64) if prompt_ids is None else np.asarray(prompt_ids, dtype=np.int64)
        if keys.shape != (n_prompts,):
            raise CehrxError(f"prompt_ids must hold one id per prompt ({n_prompts}), got shape {keys.shape}")
        if not self.constrained:
            return Prompts(tokens, offsets, np.zeros(n_prompts, np.int64), keys, num_samples)
        init_state = self.host_grammar.prompt_states(tokens, offsets)
        bad = np.flatnonzero(self.grammar.is_free(init_state))
        if len(bad):
            warnings.warn(
                f"{len(bad)} prompt(s) break the token grammar (first: prompt {bad[0]}); they are sampled unconstrained",
                stacklevel=3,
            )
        return Prompts(tokens, offsets, init_state, keys, num_samples)


class _Head(NamedTuple):
    """A grammar state's allowed tokens and their lm-head rows (`Engine._draw_by_state`)."""

    ids: Tensor  # int64: the allowed token ids
    weight: Tensor  # their lm-head rows
    watched: Tensor | None  # bool per allowed token: watched (None without watch_ids, or when none is allowed)
    forbidden: Tensor | None  # bool per allowed token: in forbid_ids (None when none is)
    control: Tensor | None  # float32 [allowed, K]: the control basis rows (None without control_basis)


def _check_prompts(model: GPT, vocab: Vocab, tokens: np.ndarray, offsets: np.ndarray) -> np.ndarray:
    if offsets.ndim != 1 or len(offsets) < 1 or offsets[0] != 0 or offsets[-1] != len(tokens):
        raise CehrxError(f"prompt_offsets must start at 0 and end at len(prompt_tokens)={len(tokens)}")
    lengths = np.diff(offsets)
    if (lengths < 1).any():
        first = int(np.flatnonzero(lengths < 1)[0])
        raise CehrxError(f"prompt {first} is empty: every prompt needs at least its demographic tokens")
    limit = model.config.max_seq_len - 1
    if len(lengths) and lengths.max() > limit:
        raise CehrxError(
            f"prompt {int(lengths.argmax())} has {int(lengths.max())} tokens; the model's context "
            f"(max_seq_len={model.config.max_seq_len}) leaves room for {limit}: cut histories shorter"
        )
    if len(tokens) and (tokens.min() < 0 or tokens.max() >= len(vocab)):
        raise CehrxError(
            f"prompt token ids must be in [0, {len(vocab)}) (the model's vocab.json), "
            f"got {int(tokens.min())}..{int(tokens.max())}"
        )
    if model.config.vocab_size != len(vocab):
        raise CehrxError(
            f"the model has vocab_size={model.config.vocab_size} but the vocabulary has {len(vocab)} tokens: "
            "use the vocab.json saved with the model"
        )
    return lengths


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


def _progress(enabled: bool, total: int):
    if not enabled:
        return None
    from tqdm.auto import tqdm

    return tqdm(total=total, unit="seq", desc="sampling", dynamic_ncols=True)
