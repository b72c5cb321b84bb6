"""Causal self-attention behind one function, for packed patients and for plain batches.

Packed batches are how cehrx trains: the patients of a batch are concatenated into one 1-D
stream of `T` real tokens (no padding) and `cu_seqlens` (int32 `[n_seq + 1]`, cumulative
lengths starting at 0, flash-attn's convention) says where each patient starts. Every backend
applies the same *document + causal* mask: a token sees earlier tokens of its own patient only,
so patients sharing a pack never attend to each other.

Backends (`resolve_backend` picks one for `auto`):

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

Unpacked `[B, T, H, D]` inputs (equal-length sequences, generation) always use sdpa with a
causal mask, aligned to the end of the keys so it also serves incremental decoding with a
`KVCache` (query length < key length). An optional `key_mask` (bool `[B, Tk]`, True = real
token) hides left padding, so prompts of different lengths share one batch; the packed path
never takes it and is unchanged.
"""

from __future__ import annotations

import functools
import importlib
import warnings
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor

BACKENDS = ("sdpa", "flex", "flash_attn")

# Query chunk length of the banded sdpa path. Smaller chunks waste fewer masked scores
# (each query scores `chunk * (1 + ceil(max_seqlen / chunk))` keys) but make smaller matmuls.
SDPA_CHUNK = 128


# --------------------------------------------------------------------------------------------
# helpers on cu_seqlens


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


def _validate_packed(cu_seqlens: Tensor, total: int, max_seqlen: int) -> None:
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


# --------------------------------------------------------------------------------------------
# backend resolution


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


def resolve_backend(name: str, device: torch.device | str) -> str:
    """The concrete backend for a configured name on a device.

    `auto` is `flash_attn` when installed and on CUDA, else `flex` on CUDA, else `sdpa`. An
    explicit name is checked, so a missing package fails here with the fix, not mid-forward.

    >>> resolve_backend("auto", "cpu")
    'sdpa'
    >>> resolve_backend("sdpa", "cuda")
    'sdpa'
    """
    device_type = torch.device(device).type
    if name == "auto":
        if device_type == "cuda":
            if flash_attn_available():
                return "flash_attn"
            if flex_available():
                return "flex"
        return "sdpa"
    if name not in BACKENDS:
        raise ValueError(f"unknown attention backend {name!r}: use auto, {', '.join(BACKENDS)}")
    if name == "flash_attn":
        if not flash_attn_available():
            raise RuntimeError(
                "attn_backend=flash_attn but flash_attn is not importable: `pip install cehrx[flash]` (CUDA only) or use attn_backend=auto"
            )
        if device_type != "cuda":
            raise RuntimeError(f"attn_backend=flash_attn needs a CUDA device, got {device_type}: use attn_backend=sdpa")
    if name == "flex" and not flex_available():
        raise RuntimeError(
            f"attn_backend=flex needs torch >= 2.5 (torch.nn.attention.flex_attention), this is torch {torch.__version__}"
        )
    return name


# --------------------------------------------------------------------------------------------
# per-forward mask


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


def build_packed_mask(
    cu_seqlens: Tensor, total: int, max_seqlen: int | None = None, backend: str = "sdpa", *, chunk: int | None = None
) -> PackedMask:
    """The `PackedMask` for `total` packed tokens split by `cu_seqlens`, for a concrete backend."""
    if max_seqlen is None:
        max_seqlen = max_seqlen_from_cu_seqlens(cu_seqlens)
    max_seqlen = max(int(max_seqlen), 1)
    _validate_packed(cu_seqlens, total, max_seqlen)
    cu_seqlens = cu_seqlens.to(torch.int32)
    pm = PackedMask(backend=backend, cu_seqlens=cu_seqlens, max_seqlen=max_seqlen, total=total)
    if backend == "sdpa":
        _build_sdpa_mask(pm, chunk or SDPA_CHUNK)
    elif backend == "flex":
        pm.block_mask = _flex_block_mask(cu_seqlens, total)
    elif backend != "flash_attn":
        raise ValueError(f"build_packed_mask needs a concrete backend, got {backend!r} (see resolve_backend)")
    return pm


def _build_sdpa_mask(pm: PackedMask, chunk: int) -> None:
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


def _flex_block_mask(cu_seqlens: Tensor, total: int) -> Any:
    from torch.nn.attention.flex_attention import create_block_mask

    seq = seq_ids_from_cu_seqlens(cu_seqlens, total)

    def document_causal(b: Tensor, h: Tensor, q_idx: Tensor, kv_idx: Tensor) -> Tensor:
        return (seq[q_idx] == seq[kv_idx]) & (kv_idx <= q_idx)

    on_cuda = cu_seqlens.device.type == "cuda"
    return create_block_mask(document_causal, None, None, total, total, device=cu_seqlens.device, _compile=on_cuda)


# --------------------------------------------------------------------------------------------
# the one entry point


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
        return _sdpa_unpacked(q, k, v, dropout_p, key_mask)
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
    if packed_mask.backend == "sdpa":
        return _sdpa_packed(q, k, v, packed_mask, dropout_p)
    if packed_mask.backend == "flex":
        return _flex_packed(q, k, v, packed_mask)
    if packed_mask.backend == "flash_attn":
        return _flash_packed(q, k, v, packed_mask, dropout_p)
    raise ValueError(f"unknown attention backend {packed_mask.backend!r}")


def _sdpa_packed(q: Tensor, k: Tensor, v: Tensor, pm: PackedMask, dropout_p: float) -> Tensor:
    T, H, D = q.shape
    if pm.chunk == 0:
        out = F.scaled_dot_product_attention(
            q.transpose(0, 1)[None],
            k.transpose(0, 1)[None],
            v.transpose(0, 1)[None],
            attn_mask=pm.sdpa_mask,
            dropout_p=dropout_p,
        )
        return out[0].transpose(0, 1)
    c, n_prev = pm.chunk, pm.n_prev
    n_chunks = pm.sdpa_mask.shape[0]
    pad_tail = n_chunks * c - T
    band = (1 + n_prev) * c
    qc = F.pad(q, (0, 0, 0, 0, 0, pad_tail)).view(n_chunks, c, H, D).transpose(1, 2)  # [n, H, c, D]
    # keys/values: front-pad n_prev chunks, then a strided window of `band` rows per chunk
    kc = F.pad(k, (0, 0, 0, 0, n_prev * c, pad_tail)).unfold(0, band, c).permute(0, 1, 3, 2)  # [n, H, band, D]
    vc = F.pad(v, (0, 0, 0, 0, n_prev * c, pad_tail)).unfold(0, band, c).permute(0, 1, 3, 2)
    out = F.scaled_dot_product_attention(qc, kc, vc, attn_mask=pm.sdpa_mask, dropout_p=dropout_p)  # [n, H, c, D]
    return out.transpose(1, 2).reshape(n_chunks * c, H, D)[:T]


@functools.cache
def _compiled_flex() -> Any:
    from torch.nn.attention.flex_attention import flex_attention

    return torch.compile(flex_attention, dynamic=True)


def _flex_packed(q: Tensor, k: Tensor, v: Tensor, pm: PackedMask) -> Tensor:
    from torch.nn.attention.flex_attention import flex_attention

    if q.device.type == "cuda":
        fn = _compiled_flex()
    else:
        if torch.is_grad_enabled() and (q.requires_grad or k.requires_grad or v.requires_grad):
            raise RuntimeError(
                "attn_backend=flex has no backward on CPU in PyTorch: use attn_backend=sdpa (or auto) to train on CPU"
            )
        fn = flex_attention
    with warnings.catch_warnings():  # eager CPU flex warns that it is unfused: known, test-only
        warnings.simplefilter("ignore", UserWarning)
        out = fn(q.transpose(0, 1)[None], k.transpose(0, 1)[None], v.transpose(0, 1)[None], block_mask=pm.block_mask)
    return out[0].transpose(0, 1)


def _flash_packed(q: Tensor, k: Tensor, v: Tensor, pm: PackedMask, dropout_p: float) -> Tensor:
    from flash_attn import flash_attn_varlen_func

    dtype = q.dtype
    if dtype not in (torch.float16, torch.bfloat16):
        # flash-attn only has half-precision kernels; fp32 callers (no autocast) get bf16 math.
        q, k, v = (t.to(torch.bfloat16) for t in (q, k, v))
    out = flash_attn_varlen_func(
        q, k, v, pm.cu_seqlens, pm.cu_seqlens, pm.max_seqlen, pm.max_seqlen, dropout_p=dropout_p, causal=True
    )
    return out.to(dtype)


def _sdpa_unpacked(q: Tensor, k: Tensor, v: Tensor, dropout_p: float, key_mask: Tensor | None = None) -> Tensor:
    Tq, Tk = q.shape[1], k.shape[1]
    qt, kt, vt = q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2)
    if key_mask is not None:
        out = F.scaled_dot_product_attention(
            qt, kt, vt, attn_mask=padded_causal_mask(key_mask, Tq), dropout_p=dropout_p
        )
    elif Tq == Tk:
        out = F.scaled_dot_product_attention(qt, kt, vt, is_causal=True, dropout_p=dropout_p)
    elif Tq == 1:  # one new token sees the whole cache
        out = F.scaled_dot_product_attention(qt, kt, vt, dropout_p=dropout_p)
    else:  # several new tokens after a cache: causal mask aligned to the end of the keys
        qi = torch.arange(Tk - Tq, Tk, device=q.device)
        mask = torch.arange(Tk, device=q.device)[None, :] <= qi[:, None]
        out = F.scaled_dot_product_attention(qt, kt, vt, attn_mask=mask, dropout_p=dropout_p)
    return out.transpose(1, 2)


def padded_causal_mask(key_mask: Tensor, n_query: int) -> Tensor:
    """Bool `[B, 1, Tq, Tk]`: causal (queries are the last `Tq` keys) and only real keys.

    A padding query (left padding) would otherwise see no key at all, and sdpa turns an
    all-masked row into NaN, which the next layer's padding keys would carry into real rows
    (0 * NaN is NaN). So every query also sees itself: padding rows stay finite, and real
    queries never see padding keys.
    """
    Tk = key_mask.shape[1]
    if n_query == 1:  # one new (real) token: it sees every real key, itself included
        return key_mask[:, None, None, :].bool()
    qi = torch.arange(Tk - n_query, Tk, device=key_mask.device)
    ki = torch.arange(Tk, device=key_mask.device)
    causal = ki[None, :] <= qi[:, None]  # [Tq, Tk]
    own = ki[None, :] == qi[:, None]
    return ((causal[None] & key_mask[:, None, :].bool()) | own[None])[:, None]
