"""One `Engine.sample` call: the batch's KV cache, its rows and their last hidden states.

`Stream.run` samples every row with the cache, `batch_size` rows at a time, refilling as rows
stop; `recompute` is the cache-free reference (one fixed batch, the whole left-padded sequence
recomputed every step). See `cehrx.sampling.engine` for how a run is organised.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import numpy as np
import torch
from torch import Tensor

from cehrx.model.kv_cache import KVCache, compaction_order
from cehrx.model.shared_prefix import SharedPrefixKVCache
from cehrx.sampling.rows import Prompts, Record, Rows

if TYPE_CHECKING:
    from cehrx.sampling.engine import Engine, ForbidWhen

__all__ = ["PREFILL_TOKENS", "Stream", "recompute"]

COMPACT_FRACTION = 8  # drop finished rows once >= 1/8 of the batch has finished
REFILL_FRACTION = 4  # admit new prompts once >= 1/4 of the batch is free ...
REFILL_MAX_WINDOW = 64  # ... and the running rows' generated part is at most this long (see Stream.run)
PREFILL_TOKENS = 1024  # padded prompt tokens per prefill forward (see Stream._admit)
SPARE_PROMPTS = 3  # a refilled batch's prompt buffer has room for this many times its first prompts' count more


class Stream:
    """Sample rows with the KV cache, refilling the batch as rows stop.

    Rows enter in the given order: whenever a quarter of the batch is free, the next rows' prompts
    are prefilled and join the running batch, so the long tail of a few slow futures runs
    alongside new work instead of in nearly empty forwards. Finished rows leave at the next
    compaction (>= 1/8 of the batch finished). Joining rows attend over the columns the running
    rows have generated so far (masked for them), so rows join only while that part is short
    (`REFILL_MAX_WINDOW`): zero-shot futures mostly stop within a few tokens and refill often;
    long generated patients run in waves, as they would without refill.
    """

    def __init__(
        self, engine: Engine, prompts: Prompts, record: Record, bar, forbid_when: ForbidWhen | None = None
    ) -> None:
        self.engine, self.prompts, self.record, self.bar = engine, prompts, record, bar
        self.forbid_when = forbid_when  # `Engine.sample`'s: which rows may not draw the forbidden tokens
        self.batch_size = engine.cfg.batch_size
        self.cache: SharedPrefixKVCache | None = None
        self.rows: Rows | None = None
        self.hidden: Tensor | None = None  # each row's last hidden state (what its next token is drawn from)
        self.n_alive = 0

    def run(self, order: np.ndarray) -> None:
        nxt = 0
        while True:
            if nxt < len(order) and self._may_admit():
                if self.n_alive == 0:
                    self.cache = self.rows = self.hidden = None
                free = self.batch_size - (0 if self.rows is None else len(self.rows.row))
                take = order[nxt : nxt + free]
                nxt += len(take)
                self._admit(take, refilled=nxt < len(order))
            if self.n_alive == 0:
                return
            self._step()

    def _may_admit(self) -> bool:
        if self.n_alive == 0:
            return True
        free = self.batch_size - len(self.rows.row)
        return (
            free * REFILL_FRACTION >= self.batch_size
            and not self.cache.folded
            and self.cache.length <= REFILL_MAX_WINDOW
        )

    def _step(self) -> None:
        """Draw one token per row, settle the stopped rows, compact, run the next forward."""
        e = self.engine
        tok, reason, watch_p = e.draw(self.hidden, self.rows, self.forbid_when)
        n_fin = self.record.settle(self.rows, tok, reason, self.bar, watch_p)
        self.n_alive -= n_fin
        if self.n_alive == 0:
            return  # everything stopped: the next round admits new rows or returns
        n_rows = len(self.rows.row)
        if n_fin and (n_rows - self.n_alive) * COMPACT_FRACTION >= n_rows:
            keep = compaction_order(self.rows.alive)  # few rows move: the cache copies only those
            self.rows, tok = self.rows.select(keep), tok[keep]
            self.cache.select_rows(keep)
        # rows riding along after a full context would step past the rotary table: clamp (their output is discarded)
        pos = (self.rows.plen + self.rows.n - 1).clamp_max(e.max_seq_len - 1)[:, None]
        self.hidden = e.model(tok[:, None], position_ids=pos, kv_cache=self.cache)[:, -1]

    def _admit(self, take: np.ndarray, refilled: bool) -> None:
        """Run each distinct prompt of rows `take` once (left-padded, lm head on the last column only);
        its samples then share its cached keys instead of one copy per sample.

        The prompt buffer is a new cache's, or the running cache's, which the new prompts and rows
        then join: their keys are written once, where they are read (`_buffer`)."""
        e, ns = self.engine, self.prompts.num_samples
        uniq, inverse = np.unique(take // ns, return_inverse=True)
        lengths = self.prompts.lengths(uniq)
        order = np.argsort(-lengths, kind="stable")  # prompt buffer row i holds prompt uniq[order[i]]
        uniq, lengths = uniq[order], lengths[order]
        width = int(lengths[0])
        target = self._buffer(len(uniq), width, refilled)
        last = prefill(e, self.prompts, uniq, lengths, target)
        rank = np.empty_like(order)
        rank[order] = np.arange(len(order))
        idx = torch.from_numpy(rank[inverse]).to(e.device)
        slot = torch.from_numpy(take % ns).to(e.device)
        plen = torch.from_numpy(lengths).to(e.device)
        if self.cache is None:
            target.advance(width)
            real = torch.arange(width, device=e.device)[None, :] >= width - plen[:, None]
            padded = not bool(real.all())  # equal-length prompts (generate) need no key mask at all
            budget = min(e.max_new, e.max_seq_len)
            capacity = budget + REFILL_MAX_WINDOW + 1 if refilled and e.device.type == "cpu" else 16
            self.cache = SharedPrefixKVCache(
                target, real if padded else None, idx, slot, ns, n_prompts=len(uniq), capacity=capacity
            )
        else:
            self.cache.join(plen, idx, slot)
        rows = e.new_rows(take, lengths[rank[inverse]], self.prompts)
        hidden = last[idx]
        if self.rows is None:
            self.hidden, self.rows = hidden, rows
        else:
            self.hidden, self.rows = torch.cat((self.hidden, hidden)), self.rows.cat(rows)
        self.n_alive += len(take)

    def _buffer(self, n_prompts: int, width: int, refilled: bool) -> KVCache:
        """Where `n_prompts` prompts of at most `width` tokens are prefilled.

        A new batch that other rows will join (`refilled`) gets room for them up front: `SPARE_PROMPTS`
        times as many prompts and, on CPU, generated columns for the token budget plus the refill window
        (`_admit`). Untouched pages cost nothing, while growing a large buffer means a fresh allocation
        whose every page faults on first write (tens of ms per step on a VM); GPU buffers start small
        and double."""
        if self.cache is not None:
            return self.cache.reserve_prompts(n_prompts, width)
        spare = SPARE_PROMPTS if refilled and self.prompts.num_samples > 1 else 0
        return self.engine.model.new_kv_cache(n_prompts * (1 + spare), width, dtype=self.engine.cache_dtype())


def prefill(engine: Engine, prompts: Prompts, uniq: np.ndarray, lengths: np.ndarray, target: KVCache) -> Tensor:
    """Prefill prompts `uniq` (sorted longest first, `lengths` tokens) into rows `0..len-1` of `target`,
    right-aligned, `PREFILL_TOKENS` at a time; each prompt's last hidden state `[P, n_embd]`.

    One forward over hundreds of histories is slower on CPU than several (its activations fall out
    of cache) and pads short prompts to the longest."""
    last = []
    for a, b in prefill_chunks(lengths, PREFILL_TOKENS):
        w = int(lengths[a])
        ids_np, real_np = left_pad(prompts.tokens, prompts.offsets, uniq[a:b], w, 0)
        ids, kmask = torch.from_numpy(ids_np).to(engine.device), torch.from_numpy(real_np).to(engine.device)
        h = engine.model(
            ids,
            position_ids=(torch.cumsum(kmask, dim=1) - 1).clamp_min(0),
            kv_cache=target.window(slice(a, b), w),
            key_mask=kmask if not real_np[:, 0].all() else None,
        )
        last.append(h[:, -1])
    return torch.cat(last)


def prefill_chunks(lengths: np.ndarray, budget: int) -> list[tuple[int, int]]:
    """Split prompts sorted longest first into runs `[a, b)` of at most `budget` padded tokens
    (`(b - a) * lengths[a]`; a prompt longer than the budget runs alone).

    >>> prefill_chunks(np.array([300, 200, 200, 100, 100, 100]), 600)
    [(0, 2), (2, 5), (5, 6)]
    """
    chunks, a = [], 0
    while a < len(lengths):
        b = a + max(1, budget // int(lengths[a]))
        chunks.append((a, min(b, len(lengths))))
        a = b
    return chunks


def left_pad(
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


def recompute(
    engine: Engine, prompts: Prompts, rows: np.ndarray, record: Record, bar, forbid_when: ForbidWhen | None = None
) -> None:
    """The cache-free reference: one fixed batch, the whole left-padded sequence recomputed every step."""
    e = engine
    row_prompt = rows // prompts.num_samples
    lengths = prompts.lengths(row_prompt)
    width = int(lengths.max())
    max_new = min(e.max_new, e.max_seq_len - int(lengths.min()))
    ids_np, real_np = left_pad(prompts.tokens, prompts.offsets, row_prompt, width, 0)
    seq = torch.zeros(len(rows), width + max_new, dtype=torch.int64, device=e.device)
    key_mask = torch.zeros_like(seq, dtype=torch.bool)
    seq[:, :width], key_mask[:, :width] = torch.from_numpy(ids_np), torch.from_numpy(real_np)
    live = e.new_rows(rows, lengths, prompts)
    n_alive = len(rows)
    for step in range(max_new):
        kmask = key_mask[:, : width + step]
        pos = (torch.cumsum(kmask, dim=1) - 1).clamp(0, e.max_seq_len - 1)
        hidden = e.model(seq[:, : width + step], position_ids=pos, key_mask=kmask)[:, -1]
        tok, reason, watch_p = e.draw(hidden, live, forbid_when)
        n_alive -= record.settle(live, tok, reason, bar, watch_p)
        if n_alive == 0:
            return
        seq[:, width + step], key_mask[:, width + step] = tok, True
