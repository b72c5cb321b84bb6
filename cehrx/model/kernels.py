"""The attention kernels behind `cehrx.model.attention.BACKENDS`, one function per use.

- packed (training, `[T, H, D]` with a `PackedMask`): `sdpa_packed`, `flex_packed`, `flash_packed`;
- padded (`[B, T, H, D]` rows, optional key mask: prefill and `KVCache` decoding): `sdpa_padded`;
- merged (output and log-sum-exp, so two attentions over disjoint keys merge exactly:
  `SharedPrefixKVCache` decoding): `sdpa_merged`.
"""

from __future__ import annotations

import functools
import warnings
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor

from cehrx.model.packed import PackedMask

__all__ = ["flash_packed", "flex_packed", "padded_causal_mask", "sdpa_merged", "sdpa_packed", "sdpa_padded"]


def sdpa_packed(q: Tensor, k: Tensor, v: Tensor, pm: PackedMask, dropout_p: float) -> Tensor:
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


def flex_packed(q: Tensor, k: Tensor, v: Tensor, pm: PackedMask) -> Tensor:
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


def flash_packed(q: Tensor, k: Tensor, v: Tensor, pm: PackedMask, dropout_p: float) -> Tensor:
    from flash_attn import flash_attn_varlen_func

    dtype = q.dtype
    if dtype not in (torch.float16, torch.bfloat16):
        # flash-attn only has half-precision kernels; fp32 callers (no autocast) get bf16 math.
        q, k, v = (t.to(torch.bfloat16) for t in (q, k, v))
    out = flash_attn_varlen_func(
        q, k, v, pm.cu_seqlens, pm.cu_seqlens, pm.max_seqlen, pm.max_seqlen, dropout_p=dropout_p, causal=True
    )
    return out.to(dtype)


def sdpa_padded(q: Tensor, k: Tensor, v: Tensor, dropout_p: float, key_mask: Tensor | None = None) -> Tensor:
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


_FLASH_CPU = getattr(torch.ops.aten, "_scaled_dot_product_flash_attention_for_cpu", None)


def sdpa_merged(q: Tensor, k: Tensor, v: Tensor, bias: Tensor | None, scale: float) -> tuple[Tensor, Tensor]:
    """Attention output (`[..., n, D]`) and the log-sum-exp of its scaled scores (`[..., n]`, fp32):
    two attentions over disjoint key sets merge exactly from these (`SharedPrefixKVCache.attend`).

    On CPU the fused flash kernel returns both in one pass (scores, softmax and values never
    materialised; ~3x faster than the matmul-softmax-matmul below on zero-shot decode shapes).
    Elsewhere the reference formula (GPU decode is launch-bound at these sizes, not arithmetic).
    `bias` is an additive mask broadcastable to the scores (`-inf` = hidden); every query must
    see at least one key.
    """
    if q.device.type == "cpu" and _FLASH_CPU is not None:
        return _FLASH_CPU(q, k, v, 0.0, False, attn_mask=bias, scale=scale)
    scores = (q @ k.transpose(-1, -2)).float() * scale
    if bias is not None:
        scores = scores + bias
    lse = torch.logsumexp(scores, -1)
    return (torch.exp(scores - lse[..., None]).to(v.dtype) @ v), lse
