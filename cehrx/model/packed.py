"""Packed batches: where each patient starts (`cu_seqlens`) and the per-forward mask (`PackedMask`).

The patients of a packed batch are concatenated into one 1-D stream of `T` real tokens;
`cu_seqlens` (int32 `[n_seq + 1]`, cumulative lengths from 0, flash-attn's convention) says where
each starts. `cehrx.model.attention.build_packed_mask` fills a `PackedMask` once per forward
with what the chosen backend needs (`sdpa_mask` / `flex_block_mask` here) and every layer reuses it.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor

__all__ = [
    "PackedMask",
    "flex_block_mask",
    "max_seqlen_from_cu_seqlens",
    "positions_from_cu_seqlens",
    "sdpa_mask",
    "seq_ids_from_cu_seqlens",
    "validate_packed",
]


def seq_ids_from_cu_seqlens(cu_seqlens: Tensor, total: int) -> Tensor:
    """Index of the packed sequence each of `total` tokens belongs to (int64 `[total]`).

    Vectorised (`searchsorted`), no host sync, so it is safe inside a compiled forward.

    >>> seq_ids_from_cu_seqlens(torch.tensor([0, 3, 3, 5], dtype=torch.int32), 5).tolist()
    [0, 0, 0, 2, 2]
    """
    cu = cu_seqlens.to(torch.int64)
    tok = torch.arange(total, device=cu.device)
    return torch.searchsorted(cu[1:], tok, right=True)


def positions_from_cu_seqlens(cu_seqlens: Tensor, total: int) -> Tensor:
    """Position of each token within its own sequence: restarts at 0 at every `cu_seqlens` entry.

    >>> positions_from_cu_seqlens(torch.tensor([0, 3, 5], dtype=torch.int32), 5).tolist()
    [0, 1, 2, 0, 1]
    """
    cu = cu_seqlens.to(torch.int64)
    tok = torch.arange(total, device=cu.device)
    return tok - cu[seq_ids_from_cu_seqlens(cu, total)]


def max_seqlen_from_cu_seqlens(cu_seqlens: Tensor) -> int:
    """Longest sequence length (a host sync: callers that know it should pass it instead).

    >>> max_seqlen_from_cu_seqlens(torch.tensor([0, 3, 10, 12], dtype=torch.int32))
    7
    """
    if cu_seqlens.numel() < 2:
        return 0
    return int((cu_seqlens[1:] - cu_seqlens[:-1]).max().item())


def validate_packed(cu_seqlens: Tensor, total: int, max_seqlen: int) -> None:
    """Catch inconsistent packing metadata early. Checks values only on CPU (no GPU sync)."""
    if cu_seqlens.dim() != 1 or cu_seqlens.numel() < 2:
        raise ValueError(f"cu_seqlens must be 1-D [n_seq + 1] with a leading 0, got shape {tuple(cu_seqlens.shape)}")
    if cu_seqlens.dtype not in (torch.int32, torch.int64):
        raise ValueError(f"cu_seqlens must be an integer tensor (int32), got {cu_seqlens.dtype}")
    if cu_seqlens.device.type == "cpu" and not torch.compiler.is_compiling():
        if int(cu_seqlens[0]) != 0 or int(cu_seqlens[-1]) != total:
            raise ValueError(
                f"cu_seqlens must run from 0 to the number of packed tokens {total}, got {cu_seqlens[0]}..{cu_seqlens[-1]}"
            )
        lengths = cu_seqlens[1:] - cu_seqlens[:-1]
        if bool((lengths < 0).any()):
            raise ValueError("cu_seqlens must be non-decreasing")
        if int(lengths.max()) > max_seqlen:
            raise ValueError(
                f"max_seqlen={max_seqlen} is shorter than the longest packed sequence ({int(lengths.max())})"
            )


@dataclass
class PackedMask:
    """Everything a backend needs about one packed batch, built once per forward.

    Building masks per layer would redo the same O(T * window) work `n_layer` times; the model
    builds this once and hands it to every layer. Fields unused by the backend are None.
    """

    backend: str
    cu_seqlens: Tensor  # int32 [n_seq + 1]
    max_seqlen: int
    total: int
    # sdpa: dense [1, 1, T, T] bool when the stream is short, else a band
    # [n_chunks, 1, chunk, (1 + n_prev) * chunk] over query chunks and their reachable keys.
    sdpa_mask: Tensor | None = None
    chunk: int = 0  # 0: dense sdpa
    n_prev: int = 0  # preceding key chunks each query chunk scores
    block_mask: Any = None  # flex BlockMask


def sdpa_mask(pm: PackedMask, chunk: int) -> None:
    """Fill `pm` with the boolean document+causal mask, banded when that saves work.

    Query chunk i (tokens [i*c, (i+1)*c)) can only reach keys of patients that started at most
    `max_seqlen - 1` tokens before it, i.e. the `n_prev = ceil((max_seqlen - 1) / c)`
    preceding chunks. Scoring `(1 + n_prev) * c` keys per query instead of T keeps the
    attention cost linear in T for long packs of short patients.
    """
    T, device = pm.total, pm.cu_seqlens.device
    seq = seq_ids_from_cu_seqlens(pm.cu_seqlens, T)
    c = min(chunk, max(pm.max_seqlen, 1))
    n_prev = -(-(pm.max_seqlen - 1) // c)
    n_chunks = -(-T // c)
    if n_chunks <= n_prev + 1:  # the band would cover everything anyway: one dense mask
        idx = torch.arange(T, device=device)
        pm.sdpa_mask = ((seq[:, None] == seq[None, :]) & (idx[None, :] <= idx[:, None]))[None, None]
        return
    pad_tail = n_chunks * c - T
    # Tail padding gets its own id so padded queries still see themselves (no all-masked row,
    # hence no NaN); leading key padding gets an id no query has.
    seq_q = F.pad(seq, (0, pad_tail), value=-2)
    seq_k = F.pad(seq_q, (n_prev * c, 0), value=-1)
    band = (1 + n_prev) * c
    q_ids = seq_q.view(n_chunks, c)
    k_ids = seq_k.unfold(0, band, c)  # [n_chunks, band]
    q_pos = torch.arange(n_chunks * c, device=device).view(n_chunks, c)
    k_pos = (torch.arange(-n_prev * c, n_chunks * c, device=device)).unfold(0, band, c)
    mask = (q_ids[:, :, None] == k_ids[:, None, :]) & (k_pos[:, None, :] <= q_pos[:, :, None])
    pm.sdpa_mask, pm.chunk, pm.n_prev = mask[:, None], c, n_prev


def flex_block_mask(cu_seqlens: Tensor, total: int) -> Any:
    from torch.nn.attention.flex_attention import create_block_mask

    seq = seq_ids_from_cu_seqlens(cu_seqlens, total)

    def document_causal(b: Tensor, h: Tensor, q_idx: Tensor, kv_idx: Tensor) -> Tensor:
        return (seq[q_idx] == seq[kv_idx]) & (kv_idx <= q_idx)

    on_cuda = cu_seqlens.device.type == "cuda"
    return create_block_mask(document_causal, None, None, total, total, device=cu_seqlens.device, _compile=on_cuda)
