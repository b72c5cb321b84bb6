"""Causal self-attention behind one function, for packed patients and for plain batches.

Packed batches are how cehrx trains: the patients of a batch are concatenated into one 1-D
stream of `T` real tokens (no padding) and `cu_seqlens` (int32 `[n_seq + 1]`, cumulative
lengths starting at 0, flash-attn's convention) says where each patient starts. Every backend
applies the same *document + causal* mask: a token sees earlier tokens of its own patient only,
so patients sharing a pack never attend to each other.

Backends: `BACKENDS` maps each name to its implementations, one per use (`Backend`: the
per-forward packed mask, packed attention, padded attention for prefill and `KVCache` decoding,
merged attention with log-sum-exps for `SharedPrefixKVCache` decoding; kernels in
`cehrx.model.kernels`). `resolve_backend` picks one for `auto` and checks an explicit name:

- `sdpa`: `torch.nn.functional.scaled_dot_product_attention` with a boolean block-diagonal
  causal mask. The reference and the CPU path. To keep the cost O(T * max_seqlen) rather
  than O(T^2), the stream is cut into query chunks that only look at the few preceding
  chunks a patient can reach (`max_seqlen` bounds that); the mask of that band is built
  once per forward (`PackedMask`) and shared by all layers.
- `flex`: `torch.nn.attention.flex_attention` with a document `BlockMask` (sparse blocks are
  skipped). Compiled on CUDA; on CPU it only runs forward (eager, unfused): PyTorch has no
  CPU backward for it.
- `flash_attn`: `flash_attn.flash_attn_varlen_func(..., causal=True)`, GPU only, imported
  lazily (`pip install cehrx[flash]`).

Unpacked `[B, T, H, D]` inputs (equal-length sequences, generation) and the KV caches' decode
steps resolve their backend the same way, without the packed path's checks (a model configured
for a GPU kernel still decodes on CPU: `strict=False`); every backend's padded and merged
implementations are sdpa today: a causal mask aligned to the end of the keys, so it also serves
incremental decoding (query length < key length), and an optional `key_mask` (bool `[B, Tk]`,
True = real token) that hides left padding, so prompts of different lengths share one batch.
The packed path never takes a key mask.
"""

from __future__ import annotations

import functools
import importlib
from collections.abc import Callable
from dataclasses import dataclass

import torch
from torch import Tensor

from cehrx.model.kernels import flash_packed, flex_packed, sdpa_merged, sdpa_packed, sdpa_padded
from cehrx.model.packed import (
    PackedMask,
    flex_block_mask,
    max_seqlen_from_cu_seqlens,
    sdpa_mask,
    validate_packed,
)

# Query chunk length of the banded sdpa path. Smaller chunks waste fewer masked scores
# (each query scores `chunk * (1 + ceil(max_seqlen / chunk))` keys) but make smaller matmuls.
SDPA_CHUNK = 128


# --------------------------------------------------------------------------------------------
# the table


@dataclass(frozen=True)
class Backend:
    """What one backend name runs, per use. `unusable(device_type)` says why it cannot run there (None: it can)."""

    name: str
    unusable: Callable[[str], str | None]
    build_mask: Callable[[PackedMask, int | None], None]  # fill the per-forward PackedMask
    packed: Callable[..., Tensor]  # (q, k, v, pm, dropout_p): packed [T, H, D]
    padded: Callable[..., Tensor]  # (q, k, v, dropout_p, key_mask): [B, T, H, D] rows, prefill and KVCache decoding
    merged: Callable[..., tuple[Tensor, Tensor]]  # (q, k, v, bias, scale) -> (out, lse): SharedPrefixKVCache decoding


@functools.cache
def flash_attn_available() -> bool:
    """True when `flash_attn` imports (it may be installed yet broken against this torch)."""
    try:
        importlib.import_module("flash_attn")
    except Exception:  # ImportError, or an undefined-symbol OSError from a mismatched build
        return False
    return True


@functools.cache
def flex_available() -> bool:
    """True when this torch ships FlexAttention (torch >= 2.5)."""
    try:
        importlib.import_module("torch.nn.attention.flex_attention")
    except ImportError:
        return False
    return True


def _flash_unusable(device_type: str) -> str | None:
    if not flash_attn_available():
        return "attn_backend=flash_attn but flash_attn is not importable: `pip install cehrx[flash]` (CUDA only) or use attn_backend=auto"
    if device_type != "cuda":
        return f"attn_backend=flash_attn needs a CUDA device, got {device_type}: use attn_backend=sdpa"
    return None


def _flex_unusable(device_type: str) -> str | None:
    if flex_available():
        return None
    return (
        f"attn_backend=flex needs torch >= 2.5 (torch.nn.attention.flex_attention), this is torch {torch.__version__}"
    )


def _sdpa_mask(pm: PackedMask, chunk: int | None) -> None:
    sdpa_mask(pm, chunk or SDPA_CHUNK)


def _flex_mask(pm: PackedMask, chunk: int | None) -> None:
    pm.block_mask = flex_block_mask(pm.cu_seqlens, pm.total)


BACKENDS: dict[str, Backend] = {
    "sdpa": Backend("sdpa", lambda device_type: None, _sdpa_mask, sdpa_packed, sdpa_padded, sdpa_merged),
    "flex": Backend(
        "flex",
        _flex_unusable,
        _flex_mask,
        lambda q, k, v, pm, dropout_p: flex_packed(q, k, v, pm),
        sdpa_padded,
        sdpa_merged,
    ),
    "flash_attn": Backend(
        "flash_attn", _flash_unusable, lambda pm, chunk: None, flash_packed, sdpa_padded, sdpa_merged
    ),
}
AUTO = {"cuda": ("flash_attn", "flex", "sdpa")}  # `auto`: the first usable backend for the device type; else sdpa


def resolve_backend(name: str, device: torch.device | str, *, strict: bool = True) -> str:
    """The concrete backend for a configured name on a device.

    `auto` is `flash_attn` when installed and on CUDA, else `flex` on CUDA, else `sdpa`. An
    explicit name is checked, so a missing package fails here with the fix, not mid-forward;
    with `strict=False` (decoding) a name that cannot run on this device resolves as `auto`.

    >>> resolve_backend("auto", "cpu")
    'sdpa'
    >>> resolve_backend("sdpa", "cuda")
    'sdpa'
    """
    device_type = torch.device(device).type
    if name != "auto":
        if name not in BACKENDS:
            raise ValueError(f"unknown attention backend {name!r}: use auto, {', '.join(BACKENDS)}")
        reason = BACKENDS[name].unusable(device_type)
        if reason is None:
            return name
        if strict:
            raise RuntimeError(reason)
    return next((n for n in AUTO.get(device_type, ()) if BACKENDS[n].unusable(device_type) is None), "sdpa")


# --------------------------------------------------------------------------------------------
# entry points


def build_packed_mask(
    cu_seqlens: Tensor, total: int, max_seqlen: int | None = None, backend: str = "sdpa", *, chunk: int | None = None
) -> PackedMask:
    """The `PackedMask` for `total` packed tokens split by `cu_seqlens`, for a concrete backend."""
    if backend not in BACKENDS:
        raise ValueError(f"build_packed_mask needs a concrete backend, got {backend!r} (see resolve_backend)")
    if max_seqlen is None:
        max_seqlen = max_seqlen_from_cu_seqlens(cu_seqlens)
    max_seqlen = max(int(max_seqlen), 1)
    validate_packed(cu_seqlens, total, max_seqlen)
    cu_seqlens = cu_seqlens.to(torch.int32)
    pm = PackedMask(backend=backend, cu_seqlens=cu_seqlens, max_seqlen=max_seqlen, total=total)
    BACKENDS[backend].build_mask(pm, chunk)
    return pm


def attention(
    q: Tensor,
    k: Tensor,
    v: Tensor,
    *,
    cu_seqlens: Tensor | None = None,
    max_seqlen: int | None = None,
    backend: str = "auto",
    packed_mask: PackedMask | None = None,
    dropout_p: float = 0.0,
    key_mask: Tensor | None = None,
) -> Tensor:
    """Causal multi-head attention; returns a tensor shaped like `q`.

    Packed: `q, k, v` are `[T, n_head, head_dim]` and `cu_seqlens` (or a prebuilt
    `packed_mask`, which carries it) splits the T tokens into independent sequences.
    Unpacked: `[B, T, n_head, head_dim]`, every row one sequence; keys may be longer than
    queries (cached decoding), in which case queries are the last positions. `key_mask`
    (unpacked only, bool `[B, Tk]`, True = real key) hides padding keys from every query.
    """
    if q.dim() == 4:
        return BACKENDS[resolve_backend(backend, q.device, strict=False)].padded(q, k, v, dropout_p, key_mask)
    if key_mask is not None:
        raise ValueError("key_mask is for unpacked [B, T, H, D] attention; packed batches have no padding")
    if q.dim() != 3:
        raise ValueError(
            f"attention expects packed [T, H, D] or unpacked [B, T, H, D] inputs, got shape {tuple(q.shape)}"
        )
    if packed_mask is None:
        if cu_seqlens is None:
            raise ValueError("packed [T, H, D] attention needs cu_seqlens (or a packed_mask) to keep patients apart")
        packed_mask = build_packed_mask(cu_seqlens, q.shape[0], max_seqlen, resolve_backend(backend, q.device))
    if packed_mask.backend not in BACKENDS:
        raise ValueError(f"unknown attention backend {packed_mask.backend!r}")
    return BACKENDS[packed_mask.backend].packed(q, k, v, packed_mask, dropout_p)


def attention_lse(
    q: Tensor, k: Tensor, v: Tensor, bias: Tensor | None, scale: float, backend: str = "auto"
) -> tuple[Tensor, Tensor]:
    """Attention output (`[..., n, D]`) and the log-sum-exp of its scaled scores (`[..., n]`, fp32), so that two
    attentions over disjoint key sets merge exactly (`SharedPrefixKVCache`). `bias`: additive mask (-inf = hidden)."""
    return BACKENDS[resolve_backend(backend, q.device, strict=False)].merged(q, k, v, bias, scale)
