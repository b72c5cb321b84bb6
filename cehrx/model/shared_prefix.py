"""`SharedPrefixKVCache`: decode many samples of few prompts without copying each prompt's keys.

Zero-shot continues every history 20 times: here each prompt's prefilled keys are kept once and
its samples score them together in one attention call; only the tokens a row generated are
stored per row. The interface is `KVCache`'s (`cehrx.model.kv_cache`): a layer calls
`attend(layer, q, k, v)`, the model calls `advance(1)` once per forward.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor

from cehrx.model.attention import attention, attention_lse
from cehrx.model.kv_cache import KVCache, compaction_order

__all__ = ["SharedPrefixKVCache"]


@dataclass
class _Tier:
    """Rows whose prefix attention runs as one grid: batch rows `rows` (None: all, in order) at
    `cells` of a `[n, slots]` grid over the prompts `prompts` (None: all; else a copy of their
    keys' last `width` columns)."""

    rows: Tensor | None
    cells: Tensor
    slots: int
    prompts: Tensor | None
    width: int


class SharedPrefixKVCache:
    """Decode `num_samples` continuations of each prefilled prompt without copying its keys.

    Why: replicating a prompt's cache for each sample (`KVCache.select_rows`) multiplies what
    every decode step reads by the number of samples. On CPU a 256-row decode over a few hundred
    cached tokens is then bound by memory traffic (the keys of 20 copies of each history), not
    arithmetic, so batching more patients stopped paying off. Here the rows are laid on a
    `[prompt, sample]` grid: each prompt's samples attend over its prefix together (one fused
    attention call for the whole grid), and each row over only the tokens it generated itself.
    The two partial attentions merge exactly by their log-sum-exps (`attention.attention_lse`), which
    gives the attention over the replicated cache.

    Decoding only (one new token per row per forward). `row_prompt[i]` is the prefix row that
    batch row `i` continues and `row_slot[i] < n_slots` its sample index (its grid cell; re-laid
    by rank as rows leave); `prefix_mask`
    (`[P, Lp]`, True = real token) hides left padding, None when no prompt is padded.
    Rows can join a running batch with their own prompts (`reserve_prompts`, prefill into it,
    `join`; or `extend` with a separately prefilled cache) and leave it (`select_rows`): all
    rows write their new token in the same column, and a row that joined later ignores the
    columns before its `start`. Prompt keys and generated keys live in buffers with spare room
    (`n_prompts` of the prefix's rows are in use, the rest are room; `capacity` generated
    columns), so joining writes in place and leaving moves only the rows `compaction_order`
    puts in holes. Rows are re-laid on the grid as samples stop
    (`_reslot`: rank within their prompt, busy prompts on a second grid). With one row per
    prompt there is nothing to share (`folded`): each prompt's keys are copied to the front of
    its row and a step is one fused sdpa, as with a plain `KVCache`; such a cache takes no
    joining rows.
    """

    def __init__(
        self,
        prefix: KVCache,
        prefix_mask: Tensor | None,
        row_prompt: Tensor,
        row_slot: Tensor,
        n_slots: int,
        n_prompts: int | None = None,
        capacity: int = 16,
    ) -> None:
        n_layer, _, n_head, _, head_dim = prefix.k.shape
        n_prompts = (
            prefix.k.shape[1] if n_prompts is None else n_prompts
        )  # prefix rows past it: spare room for joining prompts
        # Prompt keys live in buffers with room for more prompts (`_pk`: [L, P_cap, H, W, D]),
        # right-aligned; `pk` is the used part. Rows joining and leaving a running batch then
        # write into / compact within the buffers instead of concatenating the whole prefix.
        self._pk, self._pv = prefix.k[:, :, :, : prefix.length], prefix.v[:, :, :, : prefix.length]
        self.n_prompts, self.width = n_prompts, prefix.length
        self.plen = (
            prefix_mask.sum(1)
            if prefix_mask is not None
            else torch.full((n_prompts,), self.width, dtype=torch.int64, device=self._pk.device)
        )
        self._set_bias()
        self.row_prompt, self.row_slot = row_prompt.long(), row_slot.long()
        # generated tokens, per row (`_k`: [L, B_cap, H, C_cap, D]); allocated for `capacity` tokens and doubled
        # when full. Most zero-shot futures stop after a handful of tokens while the budget allows hundreds:
        # on GPU start small; on CPU, where untouched pages cost nothing and reallocating costs page faults, the caller sizes it for the budget.
        self._k = self._pk.new_empty((n_layer, len(row_prompt), n_head, capacity, head_dim))
        self._v = torch.empty_like(self._k)
        self.start = torch.zeros(len(row_prompt), dtype=torch.int64, device=self._pk.device)  # first own column per row
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
            self._k = self._pk.new_empty((n_layer, len(row_prompt), n_head, self.width + 16, head_dim))
            self._v = torch.empty_like(self._k)
            self._k[:, :, :, : self.width], self._v[:, :, :, : self.width] = (
                self.pk[:, self.row_prompt],
                self.pv[:, self.row_prompt],
            )
            self.fold_mask = prefix_mask[self.row_prompt] if prefix_mask is not None else None
            self.length = self.width
        else:
            self._reslot()

    @property
    def pk(self) -> Tensor:
        """The prompts' keys in use, `[L, P, H, width, D]` (a view of the buffer)."""
        return self._pk[:, : self.n_prompts, :, self._pk.shape[3] - self.width :]

    @property
    def pv(self) -> Tensor:
        return self._pv[:, : self.n_prompts, :, self._pv.shape[3] - self.width :]

    @property
    def k(self) -> Tensor:
        """The rows' generated keys, `[L, B, H, capacity, D]` (a view of the buffer)."""
        return self._k[:, : self.batch_size]

    @property
    def v(self) -> Tensor:
        return self._v[:, : self.batch_size]

    @property
    def batch_size(self) -> int:
        return len(self.row_prompt)

    def advance(self, n: int) -> None:
        self.length += n
        self._own_bias = None

    def attend(
        self, layer: int, q: Tensor, k: Tensor, v: Tensor, key_mask: Tensor | None = None, *, backend: str = "auto"
    ) -> Tensor:
        """Store the new token's key/value, attend over prefix + own tokens (`q`: `[B, 1, H, D]`).

        `backend`: the model's `attn_backend` (`attention.BACKENDS`), which the model passes in."""
        if q.shape[1] != 1 or key_mask is not None:
            raise ValueError(
                "SharedPrefixKVCache decodes one token per row without key_mask (the prefix mask is built in)"
            )
        end = self.length + 1
        if end > self._k.shape[3]:
            self._resize(None, 2 * self._k.shape[3])
        self.k[layer, :, :, self.length] = k[:, 0]
        self.v[layer, :, :, self.length] = v[:, 0]
        if self.folded:
            return self._attend_folded(layer, q, end, backend)
        # prefix part: each prompt's samples against its keys on a [prompt, sample] grid (see _reslot)
        out_p, lse_p = self._attend_prefix(layer, q[:, 0], backend)  # [B, H, D], [B, H]
        # own part, per row: the tokens this row generated (columns before a joining row's start are masked)
        if self.staggered and self._own_bias is None:
            cols = torch.arange(end, device=self.start.device)
            self._own_bias = _mask_bias(cols[None, :] >= self.start[:, None], q.dtype)[:, None, None, :]
        own_bias = self._own_bias if self.staggered else None
        out_s, lse_s = attention_lse(
            q.transpose(1, 2), self.k[layer, :, :, :end], self.v[layer, :, :, :end], own_bias, self.scale, backend
        )
        # one softmax over both parts: weight each part's normalised output by its share of the mass
        w_p = torch.sigmoid(lse_p - lse_s[..., 0])[..., None]  # exp(lse_p) / (exp(lse_p) + exp(lse_s))
        out = out_s[:, :, 0].float().lerp(out_p.float(), w_p)
        return out.to(q.dtype)[:, None]

    def _attend_folded(self, layer: int, q: Tensor, end: int, backend: str) -> Tensor:
        mask = None
        if self.fold_mask is not None:
            if self._own_bias is None:  # reused by every layer of this step
                self._own_bias = F.pad(self.fold_mask, (0, end - self.fold_mask.shape[1]), value=True)
            mask = self._own_bias
        k, v = self.k[layer, :, :, :end].transpose(1, 2), self.v[layer, :, :, :end].transpose(1, 2)
        return attention(q, k, v, key_mask=mask, backend=backend)

    def _attend_prefix(self, layer: int, q: Tensor, backend: str) -> tuple[Tensor, Tensor]:
        """Prefix attention of every row (`q`: `[B, H, D]`), tier by tier (see `_reslot`)."""
        pk, pv = self.pk[layer], self.pv[layer]
        parts = []
        for t in self._tiers:
            k, v, bias = pk, pv, self.bias
            if t.prompts is not None:  # the few busy prompts' keys, cut to their longest prompt
                k, v = pk[:, :, -t.width :].index_select(0, t.prompts), pv[:, :, -t.width :].index_select(0, t.prompts)
                bias = None if bias is None else bias[..., -t.width :].index_select(0, t.prompts)
            rows_q = q if t.rows is None else q.index_select(0, t.rows)
            cells = rows_q.new_zeros((k.shape[0] * t.slots, *q.shape[1:]))  # empty cells: finished or absent samples
            cells.index_copy_(0, t.cells, rows_q)
            out, lse = attention_lse(
                cells.view(k.shape[0], t.slots, *q.shape[1:]).transpose(1, 2), k, v, bias, self.scale, backend
            )  # [P, H, S, *]
            parts.append(
                (
                    t.rows,
                    out.transpose(1, 2).flatten(0, 1).index_select(0, t.cells),
                    lse.transpose(1, 2).flatten(0, 1).index_select(0, t.cells),
                )
            )
        if len(parts) == 1 and parts[0][0] is None:
            return parts[0][1], parts[0][2]
        out = q.new_empty(q.shape)
        lse = torch.empty(q.shape[:2], dtype=parts[0][2].dtype, device=q.device)
        for rows, part_out, part_lse in parts:
            out.index_copy_(0, rows, part_out)
            lse.index_copy_(0, rows, part_lse)
        return out, lse

    def select_rows(self, index: Tensor) -> None:
        """Keep batch rows `index` (finished rows leave). Prompts with no row left are dropped once
        they are a quarter of the prefix (dropping copies the kept prompts' keys within the buffer;
        an idle prompt only costs its share of the prefix attention), and the prefix is cut to its
        longest remaining prompt."""
        self._resize(index, self._k.shape[3])
        self.row_prompt, self.row_slot = self.row_prompt[index], self.row_slot[index]
        if self.folded:
            self.fold_mask = self.fold_mask[index] if self.fold_mask is not None else None
            return
        kept = torch.unique(self.row_prompt)
        width = int(self.plen[kept].max()) if len(kept) else 0
        if (self.n_prompts - len(kept)) * 4 >= self.n_prompts:
            self._drop_idle_prompts(kept)
        if 0 < width < self.width:  # prompts are right-aligned: the left columns are padding for everyone left
            self.width = width
            self._set_bias()
        self._reslot()

    def _drop_idle_prompts(self, kept: Tensor) -> None:
        """Keep only prompts `kept` (sorted ids): those past the new end fill the holes, so only they are copied."""
        used = torch.zeros(self.n_prompts, dtype=torch.bool, device=kept.device)
        used[kept] = True
        order = compaction_order(used)
        _reorder_in_place((self._pk, self._pv), order, slice(self._pk.shape[3] - self.width, None))
        new_index = torch.empty(self.n_prompts, dtype=torch.int64, device=order.device)
        new_index[order] = torch.arange(len(order), device=order.device)
        self.n_prompts, self.plen, self.row_prompt = len(order), self.plen[order], new_index[self.row_prompt]
        self._set_bias()

    def _reslot(self) -> None:
        """Lay the rows out for the prefix attention: each row at its rank among its prompt's rows,
        in one or two tiers.

        A grid `[prompts, slots]` is as wide as the busiest prompt, and zero-shot futures stop
        at very different times: a few prompts keep most of their 20 samples while most keep
        one or two, so a single grid would be mostly empty cells. So the first `s` ranks of every
        prompt form one grid over all prompts, and the ranks past `s` of the few busier prompts a
        second one over copies of just their keys; `s` minimises the cells scored (plus the copy).
        """
        counts_t = torch.bincount(self.row_prompt, minlength=self.n_prompts)
        order = torch.argsort(self.row_prompt, stable=True)
        first = torch.cumsum(counts_t, 0) - counts_t
        slot = torch.empty_like(self.row_slot)
        slot[order] = torch.arange(len(order), device=order.device) - first[self.row_prompt[order]]
        self.row_slot = slot
        counts = counts_t.cpu().numpy()
        top = max(int(counts.max()) if len(counts) else 1, 1)
        s = np.arange(1, top + 1)
        busy = (counts[None, :] > s[:, None]).sum(1)
        split = int(s[np.argmin(self.n_prompts * s + busy * (top - s + 2))])
        if split == top:
            self._tiers = [_Tier(None, self.row_prompt * top + slot, top, None, 0)]
            return
        low = torch.nonzero(slot < split)[:, 0]
        high = torch.nonzero(slot >= split)[:, 0]
        prompts = torch.from_numpy(np.flatnonzero(counts > split)).to(slot.device)
        pos = torch.full((self.n_prompts,), -1, dtype=torch.int64, device=slot.device)
        pos[prompts] = torch.arange(len(prompts), device=slot.device)
        width = min(int(self.plen[prompts].max()), self.width)
        self._tiers = [
            _Tier(low, self.row_prompt[low] * split + slot[low], split, None, 0),
            _Tier(high, pos[self.row_prompt[high]] * (top - split) + slot[high] - split, top - split, prompts, width),
        ]

    def reserve_prompts(self, m: int, width: int) -> KVCache:
        """Room for `m` more prompts of at most `width` tokens: an empty `KVCache` over their rows
        of the prompt buffer and its last `max(self.width, width)` columns. Prefill them into it
        right-aligned (`KVCache.window`), then `join` them. Idle prompts are dropped first; the buffer grows only when still full."""
        if self.folded:
            raise ValueError("a folded cache (one row per prompt) takes no joining prompts")
        if self.n_prompts + m > self._pk.shape[1]:
            self._drop_idle_prompts(torch.unique(self.row_prompt))
        n = self.n_prompts
        L, cap, H, W, D = self._pk.shape
        if n + m > cap or width > W:
            shape = (L, max(n + m, 2 * cap), H, max(width, W), D)
            pk, pv = self._pk.new_empty(shape), self._pv.new_empty(shape)
            pk[:, :n, :, shape[3] - self.width :], pv[:, :n, :, shape[3] - self.width :] = self.pk, self.pv
            self._pk, self._pv, W = pk, pv, shape[3]
        cols = slice(W - max(self.width, width), W)
        return KVCache.over(self._pk[:, n : n + m, :, cols], self._pv[:, n : n + m, :, cols])

    def join(self, plen: Tensor, row_prompt: Tensor, row_slot: Tensor) -> None:
        """Add the `len(plen)` prompts just prefilled into `reserve_prompts`' rows (their lengths)
        and their rows (`row_prompt` counts from 0 among them); the rows start at the current column."""
        n, n_old, W = self.n_prompts, self.batch_size, self._pk.shape[3]
        width = max(self.width, int(plen.max()))
        if width > self.width:  # our prompts' new left columns: padding, zeroed (0 * garbage could be NaN)
            self._pk[:, :n, :, W - width : W - self.width] = 0
            self._pv[:, :n, :, W - width : W - self.width] = 0
        self.n_prompts, self.width = n + len(plen), width
        self.plen = torch.cat((self.plen, plen))
        self._set_bias()
        self.row_prompt = torch.cat((self.row_prompt, row_prompt.long() + n))
        self.row_slot = torch.cat((self.row_slot, row_slot.long()))
        self._resize(None, self._k.shape[3], extra_rows=len(row_prompt), n_rows=n_old)
        self.start = torch.cat(
            (self.start, torch.full((len(row_prompt),), self.length, dtype=torch.int64, device=self.start.device))
        )
        self.staggered = self.staggered or (n_old > 0 and self.length > 0)
        self._own_bias = None
        self._reslot()

    def extend(self, other: SharedPrefixKVCache) -> None:
        """Append the rows (and prompts) of a freshly prefilled cache: its keys are copied into
        ours (`reserve_prompts` + `join`; the sampler prefills into ours directly instead)."""
        if other.folded or other.length:
            raise ValueError("extend takes a fresh cache (nothing decoded yet), not folded")
        win = self.reserve_prompts(other.n_prompts, other.width).window(slice(None), other.width)
        win.k.copy_(other.pk)
        win.v.copy_(other.pv)
        self.join(other.plen, other.row_prompt, other.row_slot)

    def _set_bias(self) -> None:
        """The additive prefix mask `[P, 1, 1, width]` from the prompt lengths (None: no padding)."""
        cols = torch.arange(self.width, device=self.plen.device)
        pad = cols[None, :] < self.width - self.plen[:, None]
        self.bias = _mask_bias(~pad, self._pk.dtype)[:, None, None, :] if bool(pad.any()) else None

    def _resize(self, rows: Tensor | None, capacity: int, extra_rows: int = 0, n_rows: int | None = None) -> None:
        """Keep batch rows `rows` (None: the first `n_rows`, default all, in order) at the front of
        the per-row buffers, plus `extra_rows` empty rows, with room for `capacity` columns. The
        buffers are reused when big enough; only the filled columns still needed (from the
        earliest kept `start`) are moved."""
        if rows is None:
            rows = torch.arange(self.batch_size if n_rows is None else n_rows, device=self._k.device)
        lo = int(self.start[rows].min()) if len(rows) and self.length else 0
        n = self.length - lo
        if n + 1 > capacity:  # full: double (growing by the one column the next step needs would reallocate every step)
            capacity = max(2 * capacity, n + 1)
        need = len(rows) + extra_rows
        L, cap_rows, H, cap_cols, D = self._k.shape
        k, v = self._k, self._v
        if need > cap_rows or capacity > cap_cols:
            shape = (L, max(need, cap_rows), H, max(capacity, cap_cols), D)
            k, v = self._k.new_empty(shape), self._v.new_empty(shape)
        if n and k is self._k and lo == 0:  # in place: move only the rows whose position changes
            _reorder_in_place((k, v), rows, slice(0, n))
        elif n:
            k[:, : len(rows), :, :n] = self._k[:, rows, :, lo : self.length]
            v[:, : len(rows), :, :n] = self._v[:, rows, :, lo : self.length]
        k[:, len(rows) : need, :, :n] = 0  # joining rows mask these columns out; 0 * garbage could be NaN
        v[:, len(rows) : need, :, :n] = 0
        self._k, self._v = k, v
        self.start = self.start[rows] - lo
        self.length = n
        self._own_bias = None


def _reorder_in_place(buffers: tuple[Tensor, ...], order: Tensor, cols: slice) -> None:
    """Put entry `order[i]` of dim 1 at position `i` (columns `cols` of dim 3), copying only the
    entries that change position (few, with `compaction_order`). The gather copies first, so
    sources and destinations may overlap."""
    moved = torch.nonzero(order != torch.arange(len(order), device=order.device))[:, 0]
    if len(moved):
        src = order[moved]
        for b in buffers:
            for layer in b[
                :, :, :, cols
            ]:  # per layer: index_select/index_copy_ on dim 0 are ~2x faster on CPU than 5-d advanced indexing
                layer.index_copy_(0, moved, layer.index_select(0, src))


def _mask_bias(mask: Tensor, dtype: torch.dtype) -> Tensor:
    """0 where `mask` is True, -inf where False (added to attention scores)."""
    return torch.zeros(mask.shape, dtype=dtype, device=mask.device).masked_fill(~mask, float("-inf"))
