"""Key/value caches for incremental decoding (generation and zero-shot futures).

Two caches share one interface: a layer calls `attend(layer, q, k, v, key_mask)` with the new
token's projections (`[B, t, H, D]`) and gets the attention output (`[B, t, H, D]`); the model
calls `advance(t)` once per forward, after every layer.

- `KVCache`: one key/value buffer per row. Prefill (prompts of any length, left-padded with a
  `key_mask`) and plain decoding.
- `SharedPrefixKVCache`: many samples of few prompts (zero-shot: 20 futures per history). Each
  prompt's prefilled keys are kept once, not once per sample, and the samples of a prompt score
  them together in one matmul; only the tokens a row generated are stored per row.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import Tensor

from cehrx.model.attention import attention

__all__ = ["KVCache", "SharedPrefixKVCache"]


class KVCache:
    """Key/value buffers of every layer for incremental decoding of a `[B, T]` batch.

    Preallocated to `max_len` so decoding appends in place. Layers call `update` (write the
    new keys, read back everything so far); the model calls `advance` once per forward, after
    all layers, so every layer writes at the same offset. Stored head-major
    (`[n_layer, B, H, max_len, D]`): the cached prefix of each head is one contiguous block,
    the layout sdpa reads fastest; `update` still takes and returns `[B, T, H, D]` views.
    """

    def __init__(self, n_layer: int, batch_size: int, max_len: int, n_head: int, head_dim: int, *, device: torch.device | str | None = None, dtype: torch.dtype = torch.float32) -> None:
        shape = (n_layer, batch_size, n_head, max_len, head_dim)
        # uninitialised: every position is written before it is read (zeroing a cache sized for
        # the longest continuation costs more than decoding short ones)
        self.k = torch.empty(shape, device=device, dtype=dtype)
        self.v = torch.empty(shape, device=device, dtype=dtype)
        self.max_len = max_len
        self.length = 0

    def update(self, layer: int, k: Tensor, v: Tensor) -> tuple[Tensor, Tensor]:
        """Store `k, v` (`[B, t, H, D]`) after the cached tokens; return all keys/values so far (`[B, T, H, D]` views)."""
        end = self.length + k.shape[1]
        if end > self.max_len:
            raise ValueError(f"KVCache holds {self.max_len} tokens; {end} requested")
        self.k[layer, :, :, self.length : end] = k.transpose(1, 2)
        self.v[layer, :, :, self.length : end] = v.transpose(1, 2)
        return self.k[layer, :, :, :end].transpose(1, 2), self.v[layer, :, :, :end].transpose(1, 2)

    def attend(self, layer: int, q: Tensor, k: Tensor, v: Tensor, key_mask: Tensor | None = None) -> Tensor:
        """Cache the new keys/values, then causal attention of `q` over everything cached."""
        k, v = self.update(layer, k, v)
        return attention(q, k, v, key_mask=key_mask)

    def advance(self, n: int) -> None:
        self.length += n

    def reset(self) -> None:
        self.length = 0

    @property
    def batch_size(self) -> int:
        return self.k.shape[1]

    def select_rows(self, index: Tensor) -> None:
        """Keep (and reorder / repeat) batch rows `index` in place: finished rows are dropped,
        a prefilled prompt is replicated for each of its samples. Copies the filled part only."""
        n = self.length
        k = self.k.new_empty((self.k.shape[0], len(index), *self.k.shape[2:]))  # the tail is written before it is read
        v = torch.empty_like(k)
        k[:, :, :, :n] = self.k[:, index, :, :n]
        v[:, :, :, :n] = self.v[:, index, :, :n]
        self.k, self.v = k, v

    def grow(self, max_len: int) -> None:
        """Make room for `max_len` tokens (keeping what is cached), e.g. after a prompt-sized prefill."""
        if max_len <= self.max_len:
            return
        pad = (0, 0, 0, max_len - self.max_len)
        self.k, self.v = F.pad(self.k, pad), F.pad(self.v, pad)
        self.max_len = max_len


class SharedPrefixKVCache:
    """Decode `num_samples` continuations of each prefilled prompt without copying its keys.

    Why: replicating a prompt's cache for each sample (`KVCache.select_rows`) multiplies what
    every decode step reads by the number of samples. On CPU a 256-row decode over a few hundred
    cached tokens is then bound by memory traffic (the keys of 20 copies of each history), not
    arithmetic, so batching more patients stopped paying off. Here the rows are laid on a
    `[prompt, sample]` grid: each prompt's samples score its prefix in one `[S, D] x [D, Lp]`
    matmul per head, and each row scores only the tokens it generated itself. One softmax over
    both parts gives exactly the attention over the replicated cache.

    Decoding only (one new token per row per forward). `row_prompt[i]` is the prefix row that
    batch row `i` continues and `row_slot[i] < n_slots` its sample index; `prefix_mask`
    (`[P, Lp]`, True = real token) hides left padding, None when no prompt is padded.
    Rows can join a running batch (`extend`, with their own prompts) and leave it
    (`select_rows`): all rows write their new token in the same column, and a row that joined
    later ignores the columns before its `start`. With one row per prompt there is nothing to
    share (`folded`): each prompt's keys are copied to the front of its row and a step is one
    fused sdpa, as with a plain `KVCache`; such a cache takes no joining rows.
    """

    def __init__(self, prefix: KVCache, prefix_mask: Tensor | None, row_prompt: Tensor, row_slot: Tensor, n_slots: int) -> None:
        n_layer, _, n_head, _, head_dim = prefix.k.shape
        self.pk = prefix.k[:, :, :, : prefix.length]  # [L, P, H, Lp, D]
        self.pv = prefix.v[:, :, :, : prefix.length]
        self.bias = None if prefix_mask is None else _mask_bias(prefix_mask, self.pk.dtype)[:, None, None, :]  # [P, 1, 1, Lp]
        n_prompts, width = self.pk.shape[1], self.pk.shape[3]
        self.plen = prefix_mask.sum(1) if prefix_mask is not None else torch.full((n_prompts,), width, dtype=torch.int64, device=self.pk.device)
        self.row_prompt, self.row_slot, self.n_slots = row_prompt.long(), row_slot.long(), n_slots
        # generated tokens, per row; allocated for a few tokens and doubled when full, because most
        # zero-shot futures stop after a handful of tokens while the budget allows hundreds
        self.k = self.pk.new_empty((n_layer, len(row_prompt), n_head, 16, head_dim))
        self.v = torch.empty_like(self.k)
        self.start = torch.zeros(len(row_prompt), dtype=torch.int64, device=self.pk.device)  # first own column per row
        self.staggered = False  # True once rows with different starts share the batch
        self.length = 0  # columns written: after every compaction the earliest kept row starts at 0,
        # so this is also how many generated columns every step scores
        self.scale = 1.0 / math.sqrt(head_dim)
        self._own_bias: Tensor | None = None
        # One row per prompt (e.g. generate, one sample each): nothing to share, so each row's prompt
        # keys go to the front of its own buffer and a step is one fused attention over that buffer.
        self.folded = n_slots == 1 and len(self.row_prompt) == n_prompts
        self.fold_mask = None  # [B, Lp] real prompt columns of folded rows (None: no padding)
        if self.folded:
            self.k = self.pk.new_empty((n_layer, len(row_prompt), n_head, width + 16, head_dim))
            self.v = torch.empty_like(self.k)
            self.k[:, :, :, :width], self.v[:, :, :, :width] = self.pk[:, self.row_prompt], self.pv[:, self.row_prompt]
            self.fold_mask = prefix_mask[self.row_prompt] if prefix_mask is not None else None
            self.length = width

    @property
    def batch_size(self) -> int:
        return len(self.row_prompt)

    def advance(self, n: int) -> None:
        self.length += n
        self._own_bias = None

    def attend(self, layer: int, q: Tensor, k: Tensor, v: Tensor, key_mask: Tensor | None = None) -> Tensor:
        """Store the new token's key/value, attend over prefix + own tokens (`q`: `[B, 1, H, D]`)."""
        if q.shape[1] != 1 or key_mask is not None:
            raise ValueError("SharedPrefixKVCache decodes one token per row without key_mask (the prefix mask is built in)")
        end = self.length + 1
        if end > self.k.shape[3]:
            self._resize(torch.arange(self.batch_size, device=self.k.device), 2 * self.k.shape[3])
        self.k[layer, :, :, self.length] = k[:, 0]
        self.v[layer, :, :, self.length] = v[:, 0]
        if self.folded:
            return self._attend_folded(layer, q, end)
        grid = self.row_prompt * self.n_slots + self.row_slot  # each row's cell on the [P, S] grid
        qr = q[:, 0] * self.scale  # [B, H, D]
        # prefix part on the grid: unnormalised softmax numerators, their max and sum per row
        scores = self._to_grid(qr, grid) @ self.pk[layer].transpose(-1, -2)  # [P, H, S, Lp]
        if self.bias is not None:
            scores += self.bias
        m_p, sum_p, out_p = _partial_softmax(scores.float(), self.pv[layer])
        m_p, sum_p, out_p = (self._from_grid(x, grid) for x in (m_p, sum_p, out_p))  # [B, H], [B, H], [B, H, D]
        # own part, per row: the tokens this row generated
        own_k, own_v = self.k[layer, :, :, :end], self.v[layer, :, :, :end]  # [B, H, t, D]
        scores_s = (own_k @ qr[..., None]).transpose(-1, -2)  # [B, H, 1, t]
        if self.staggered:
            if self._own_bias is None:
                cols = torch.arange(end, device=self.start.device)
                self._own_bias = _mask_bias(cols[None, :] >= self.start[:, None], scores_s.dtype)[:, None, None, :]
            scores_s = scores_s + self._own_bias
        m_s, sum_s, out_s = _partial_softmax(scores_s.float(), own_v)
        m_s, sum_s, out_s = m_s[..., 0], sum_s[..., 0], out_s[..., 0, :]
        # one softmax over both parts (log-sum-exp merge)
        m = torch.maximum(m_p, m_s)
        a, b = torch.exp(m_p - m), torch.exp(m_s - m)
        out = (out_p * a[..., None] + out_s * b[..., None]) / (sum_p * a + sum_s * b)[..., None]
        return out.to(q.dtype)[:, None]

    def _attend_folded(self, layer: int, q: Tensor, end: int) -> Tensor:
        mask = None
        if self.fold_mask is not None:
            if self._own_bias is None:  # reused by every layer of this step
                self._own_bias = F.pad(self.fold_mask, (0, end - self.fold_mask.shape[1]), value=True)[:, None, None, :]
            mask = self._own_bias
        out = F.scaled_dot_product_attention(q.transpose(1, 2), self.k[layer, :, :, :end], self.v[layer, :, :, :end], attn_mask=mask)
        return out.transpose(1, 2)

    def _to_grid(self, x: Tensor, grid: Tensor) -> Tensor:
        """Rows `[B, H, D]` onto the zero-filled grid `[P, H, S, D]` (empty cells: finished or absent samples)."""
        cells = x.new_zeros((self.pk.shape[1] * self.n_slots, *x.shape[1:]))
        cells.index_copy_(0, grid, x)
        return cells.view(self.pk.shape[1], self.n_slots, *x.shape[1:]).transpose(1, 2)

    @staticmethod
    def _from_grid(x: Tensor, grid: Tensor) -> Tensor:
        """Grid `[P, H, S, *X]` back to rows `[B, H, *X]`."""
        return x.transpose(1, 2).flatten(0, 1).index_select(0, grid)

    def select_rows(self, index: Tensor) -> None:
        """Keep batch rows `index` (finished rows leave). Prompts with no row left are dropped once
        they are a quarter of the prefix (dropping copies the prefix keys; an idle prompt only costs
        its share of the prefix matmul), and the prefix is cut to its longest remaining prompt."""
        self._resize(index, self.k.shape[3])
        self.row_prompt, self.row_slot = self.row_prompt[index], self.row_slot[index]
        if self.folded:
            self.fold_mask = self.fold_mask[index] if self.fold_mask is not None else None
            return
        kept, inverse = torch.unique(self.row_prompt, return_inverse=True)
        width = int(self.plen[kept].max()) if len(kept) else 0
        if (self.pk.shape[1] - len(kept)) * 4 >= self.pk.shape[1]:
            self.pk, self.pv, self.plen, self.row_prompt = self.pk[:, kept], self.pv[:, kept], self.plen[kept], inverse
            self.bias = self.bias[kept] if self.bias is not None else None
        if 0 < width < self.pk.shape[3]:  # prompts are right-aligned: the left columns are padding for everyone left
            self.pk, self.pv = self.pk[:, :, :, -width:], self.pv[:, :, :, -width:]
            self.bias = self.bias[..., -width:] if self.bias is not None else None

    def extend(self, other: SharedPrefixKVCache) -> None:
        """Append the rows (and prompts) of a freshly prefilled cache; they start at the current column."""
        if self.folded or other.folded or other.length or other.n_slots != self.n_slots:
            raise ValueError("extend takes a fresh cache (nothing decoded yet) with the same number of samples per prompt, neither folded")
        width = max(self.pk.shape[3], other.pk.shape[3])
        pk, pv, bias = _left_pad_prefix(self, width)
        opk, opv, obias = _left_pad_prefix(other, width)
        self.pk, self.pv = torch.cat((pk, opk), 1), torch.cat((pv, opv), 1)
        self.bias = None if bias is None and obias is None else torch.cat((_or_zero(bias, pk), _or_zero(obias, opk)))
        self.plen = torch.cat((self.plen, other.plen))
        n_old = self.batch_size
        self.row_prompt = torch.cat((self.row_prompt, other.row_prompt + pk.shape[1]))
        self.row_slot = torch.cat((self.row_slot, other.row_slot))
        self._resize(torch.arange(n_old, device=self.k.device), self.k.shape[3], extra_rows=other.batch_size)
        self.start = torch.cat((self.start, torch.full((other.batch_size,), self.length, dtype=torch.int64, device=self.start.device)))
        self.staggered = self.staggered or (n_old > 0 and self.length > 0)
        self._own_bias = None

    def _resize(self, rows: Tensor, capacity: int, extra_rows: int = 0) -> None:
        """New per-row buffers for batch rows `rows` (+ `extra_rows` empty ones) holding `capacity`
        columns; only the filled columns still needed (from the earliest kept `start`) are copied."""
        lo = int(self.start[rows].min()) if len(rows) and self.length else 0
        n = self.length - lo
        capacity = max(capacity, n + 1)
        shape = (self.k.shape[0], len(rows) + extra_rows, self.k.shape[2], capacity, self.k.shape[4])
        k, v = self.k.new_empty(shape), self.v.new_empty(shape)
        k[:, : len(rows), :, :n] = self.k[:, rows, :, lo : self.length]
        v[:, : len(rows), :, :n] = self.v[:, rows, :, lo : self.length]
        k[:, len(rows) :, :, :n] = 0  # joining rows mask these columns out; 0 * garbage could be NaN
        v[:, len(rows) :, :, :n] = 0
        self.k, self.v = k, v
        self.start = self.start[rows] - lo
        self.length = n
        self._own_bias = None


def _partial_softmax(scores: Tensor, values: Tensor) -> tuple[Tensor, Tensor, Tensor]:
    """Max, sum of exp(scores - max) and the unnormalised output over the last axis (`[..., n]`
    scores, `[..., n, D]` values): two partial softmaxes merge exactly from these.

    The sum comes from `torch.softmax` (the largest probability is 1 / sum, the max's own term
    being exp(0)): its fused kernel is several times faster on CPU than `exp` of the shifted
    scores, whose masked (-inf) and very negative entries take a slow path.
    """
    p = torch.softmax(scores, -1)
    total = 1.0 / p.amax(-1)
    return scores.amax(-1), total, (p.to(values.dtype) @ values) * total[..., None].to(values.dtype)


def _mask_bias(mask: Tensor, dtype: torch.dtype) -> Tensor:
    """0 where `mask` is True, -inf where False (added to attention scores)."""
    return torch.zeros(mask.shape, dtype=dtype, device=mask.device).masked_fill(~mask, float("-inf"))


def _left_pad_prefix(c: SharedPrefixKVCache, width: int) -> tuple[Tensor, Tensor, Tensor | None]:
    """A cache's prefix keys, values and bias left-padded to `width` columns (padding masked)."""
    pad = width - c.pk.shape[3]
    if pad == 0:
        return c.pk, c.pv, c.bias
    return F.pad(c.pk, (0, 0, pad, 0)), F.pad(c.pv, (0, 0, pad, 0)), F.pad(_or_zero(c.bias, c.pk), (pad, 0), value=float("-inf"))


def _or_zero(bias: Tensor | None, pk: Tensor) -> Tensor:
    """The prefix bias, or an all-zero one (no padding) shaped for `pk`'s prompts."""
    return torch.zeros((pk.shape[1], 1, 1, pk.shape[3]), dtype=pk.dtype, device=pk.device) if bias is None else bias
