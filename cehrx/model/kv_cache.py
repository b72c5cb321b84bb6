"""Key/value caches for incremental decoding (generation and zero-shot futures).

Two caches share one interface: a layer calls `attend(layer, q, k, v, key_mask)` with the new
token's projections (`[B, t, H, D]`) and gets the attention output (`[B, t, H, D]`); the model
calls `advance(t)` once per forward, after every layer.

- `KVCache`: one key/value buffer per row. Prefill (prompts of any length, left-padded with a
  `key_mask`) and plain decoding.
- `SharedPrefixKVCache` (`cehrx.model.shared_prefix`): many samples of few prompts (zero-shot: 20 futures per history). Each
  prompt's prefilled keys are kept once, not once per sample, and the samples of a prompt score
  them together in one attention call; only the tokens a row generated are stored per row.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor

from cehrx.model.attention import attention

__all__ = ["KVCache", "compaction_order"]


class KVCache:
    """Key/value buffers of every layer for incremental decoding of a `[B, T]` batch.

    Preallocated to `max_len` so decoding appends in place. Layers call `update` (write the
    new keys, read back everything so far); the model calls `advance` once per forward, after
    all layers, so every layer writes at the same offset. Stored head-major
    (`[n_layer, B, H, max_len, D]`): the cached prefix of each head is one contiguous block,
    the layout sdpa reads fastest; `update` still takes and returns `[B, T, H, D]` views.
    """

    def __init__(
        self,
        n_layer: int,
        batch_size: int,
        max_len: int,
        n_head: int,
        head_dim: int,
        *,
        device: torch.device | str | None = None,
        dtype: torch.dtype = torch.float32,
    ) -> None:
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

    def attend(
        self, layer: int, q: Tensor, k: Tensor, v: Tensor, key_mask: Tensor | None = None, *, backend: str = "auto"
    ) -> Tensor:
        """Cache the new keys/values, then causal attention of `q` over everything cached.

        `backend`: the model's `attn_backend` (`attention.BACKENDS`), which the model passes in."""
        k, v = self.update(layer, k, v)
        return attention(q, k, v, key_mask=key_mask, backend=backend)

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

    @classmethod
    def over(cls, k: Tensor, v: Tensor) -> KVCache:
        """An empty cache writing into `k`, `v` (`[n_layer, B, H, max_len, D]`, views allowed)."""
        cache = object.__new__(cls)
        cache.k, cache.v, cache.max_len, cache.length = k, v, k.shape[3], 0
        return cache

    def window(self, rows: slice, width: int) -> KVCache:
        """An empty cache over batch rows `rows` and the last `width` columns of this one, sharing
        its memory: prompts prefilled in several forwards land right-aligned in one buffer. The
        columns left of the window are those rows' padding: zeroed here, since attention masks
        them by adding -inf and 0 * uninitialised memory could be NaN."""
        pad = self.max_len - width
        for buf in (self.k, self.v):
            buf[:, rows, :, :pad] = 0
        return KVCache.over(self.k[:, rows, :, pad:], self.v[:, rows, :, pad:])

    def grow(self, max_len: int) -> None:
        """Make room for `max_len` tokens (keeping what is cached), e.g. after a prompt-sized prefill."""
        if max_len <= self.max_len:
            return
        pad = (0, 0, 0, max_len - self.max_len)
        self.k, self.v = F.pad(self.k, pad), F.pad(self.v, pad)
        self.max_len = max_len


def compaction_order(keep: Tensor) -> Tensor:
    """The indices of the True entries of `keep`, ordered to move as few as possible when they are
    packed to the front: entries already inside the packed range stay put, those past it fill the
    holes. Compacting a batch row order this way copies only the moved rows' cached keys.

    >>> compaction_order(torch.tensor([True, False, True, False, True, True])).tolist()
    [0, 4, 2, 5]
    """
    n = int(keep.sum())
    order = torch.arange(n, device=keep.device)
    order[torch.nonzero(~keep[:n])[:, 0]] = torch.nonzero(keep[n:])[:, 0] + n
    return order
