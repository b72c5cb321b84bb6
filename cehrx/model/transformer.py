"""The decoder-only transformer backbone (litgpt / nanoGPT style).

Pre-norm blocks of RMSNorm -> causal self-attention with rotary positions -> RMSNorm ->
SwiGLU MLP, no biases, token embedding tied to the output head. The model returns hidden
states; heads (next-token logits via `lm_head_logits`, auxiliary time heads) live on top, so a
loss only ever computes logits for the positions it needs.

Two input layouts share the same weights:

- packed `[T]` + `cu_seqlens`: patients concatenated without padding (training). Positions
  restart at 0 for each patient and attention never crosses a patient boundary.
- unpacked `[B, T]`: equal-length sequences, plain causal attention, optional `KVCache`
  (generation). Left-padded rows of different lengths pass `key_mask` (hides the padding
  keys) and per-row `position_ids` (each sequence starts at 0).
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from cehrx.model.attention import attention, build_packed_mask, resolve_backend
from cehrx.model.config import GPTConfig
from cehrx.model.kv_cache import KVCache
from cehrx.model.packed import PackedMask, positions_from_cu_seqlens
from cehrx.model.shared_prefix import SharedPrefixKVCache

__all__ = ["GPT", "MLP", "Attention", "Block", "KVCache", "RMSNorm", "RotaryEmbedding", "positions_from_cu_seqlens"]


class RMSNorm(nn.Module):
    """Root-mean-square norm with a learned gain, computed in fp32 for bf16 stability."""

    def __init__(self, dim: int, eps: float = 1e-5) -> None:
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))

    def reset_parameters(self) -> None:
        nn.init.ones_(self.weight)

    def forward(self, x: Tensor) -> Tensor:
        return F.rms_norm(x.float(), (x.shape[-1],), self.weight.float(), self.eps).to(x.dtype)


class RotaryEmbedding(nn.Module):
    """Rotary position tables, indexed by explicit `position_ids`.

    Positions are given, not implied by the token index, because in a packed batch every
    patient restarts at 0. Tables are fp32 non-persistent buffers (recomputed, not saved), so
    a model built on the meta device must call `reset_parameters()` after materialising.
    """

    def __init__(self, head_dim: int, max_seq_len: int, base: float = 10000.0) -> None:
        super().__init__()
        self.head_dim, self.max_seq_len, self.base = head_dim, max_seq_len, base
        cos, sin = self._tables(None)
        self.register_buffer("cos", cos, persistent=False)
        self.register_buffer("sin", sin, persistent=False)

    def _tables(self, device: torch.device | None) -> tuple[Tensor, Tensor]:
        """cos and *signed* sin, both `[max_seq_len, head_dim]`, laid out for `apply_rotary`."""
        inv_freq = 1.0 / (
            self.base ** (torch.arange(0, self.head_dim, 2, device=device, dtype=torch.float32) / self.head_dim)
        )
        angles = torch.outer(torch.arange(self.max_seq_len, device=device, dtype=torch.float32), inv_freq)
        cos, sin = angles.cos(), angles.sin()
        return torch.cat((cos, cos), -1), torch.cat((-sin, sin), -1)

    def reset_parameters(self) -> None:
        """Recompute the tables (e.g. after materialising a meta-device model)."""
        self.cos, self.sin = self._tables(self.cos.device)

    def forward(self, position_ids: Tensor) -> tuple[Tensor, Tensor]:
        """cos, signed sin shaped `[*position_ids.shape, 1, 1, head_dim]`: they broadcast over
        the stacked (q, k) axis and the heads of `[..., 2, H, D]`."""
        return self.cos[position_ids][..., None, None, :], self.sin[position_ids][..., None, None, :]


def apply_rotary(x: Tensor, cos: Tensor, sin: Tensor) -> Tensor:
    """Rotate `x` (`[..., D]`) by position, half-split (GPT-NeoX / LLaMA) convention, fp32 math.

    With `sin` signed as `[-sin, sin]` the rotation `(x1 cos - x2 sin, x2 cos + x1 sin)` is
    `x * cos + swap_halves(x) * sin`: four kernels, which matters on CPU where this runs on
    q and k of every layer.
    """
    xf = x.float()
    x1, x2 = xf.chunk(2, dim=-1)
    return (xf * cos + torch.cat((x2, x1), dim=-1) * sin).to(x.dtype)


class Attention(nn.Module):
    """Multi-head causal self-attention: fused qkv projection, rotary q/k, one output projection."""

    def __init__(self, config: GPTConfig, layer_idx: int) -> None:
        super().__init__()
        self.n_head, self.head_dim, self.layer_idx = config.n_head, config.head_dim, layer_idx
        self.qkv = nn.Linear(config.n_embd, 3 * config.n_embd, bias=False)
        self.proj = nn.Linear(config.n_embd, config.n_embd, bias=False)
        self.proj.residual_out = True  # writes into the residual stream: scaled init
        self.dropout = config.dropout

    def forward(
        self,
        x: Tensor,
        rope: tuple[Tensor, Tensor],
        packed_mask: PackedMask | None = None,
        kv_cache: KVCache | SharedPrefixKVCache | None = None,
        key_mask: Tensor | None = None,
        backend: str = "auto",
    ) -> Tensor:
        """`backend`: the model's resolved `attn_backend` for unpacked rows and cached decoding
        (a packed batch carries its own in `packed_mask`)."""
        qkv = self.qkv(x).view(*x.shape[:-1], 3, self.n_head, self.head_dim)
        q, k = apply_rotary(qkv[..., :2, :, :], *rope).unbind(-3)  # q and k rotated in one pass
        v = qkv[..., 2, :, :]
        if kv_cache is not None:
            y = kv_cache.attend(self.layer_idx, q, k, v, key_mask, backend=backend)
        else:
            dropout_p = self.dropout if self.training else 0.0
            y = attention(q, k, v, packed_mask=packed_mask, dropout_p=dropout_p, key_mask=key_mask, backend=backend)
        return self.proj(y.reshape(*x.shape[:-1], -1))


class MLP(nn.Module):
    """SwiGLU feed-forward: `proj(silu(gate(x)) * up(x))`, gate and up fused in one matmul."""

    def __init__(self, config: GPTConfig) -> None:
        super().__init__()
        assert config.intermediate_size is not None  # resolved by GPTConfig.__post_init__
        self.fc = nn.Linear(config.n_embd, 2 * config.intermediate_size, bias=False)
        self.proj = nn.Linear(config.intermediate_size, config.n_embd, bias=False)
        self.proj.residual_out = True  # writes into the residual stream: scaled init

    def forward(self, x: Tensor) -> Tensor:
        gate, up = self.fc(x).chunk(2, dim=-1)
        return self.proj(F.silu(gate) * up)


class Block(nn.Module):
    """Pre-norm residual block: `x + attn(norm(x))`, then `x + mlp(norm(x))`."""

    def __init__(self, config: GPTConfig, layer_idx: int) -> None:
        super().__init__()
        self.norm_1 = RMSNorm(config.n_embd, config.norm_eps)
        self.attn = Attention(config, layer_idx)
        self.norm_2 = RMSNorm(config.n_embd, config.norm_eps)
        self.mlp = MLP(config)
        self.drop = nn.Dropout(config.dropout)

    def forward(
        self,
        x: Tensor,
        rope: tuple[Tensor, Tensor],
        packed_mask: PackedMask | None = None,
        kv_cache: KVCache | SharedPrefixKVCache | None = None,
        key_mask: Tensor | None = None,
        backend: str = "auto",
    ) -> Tensor:
        x = x + self.drop(self.attn(self.norm_1(x), rope, packed_mask, kv_cache, key_mask, backend))
        return x + self.drop(self.mlp(self.norm_2(x)))


class GPT(nn.Module):
    """Token embedding -> `n_layer` blocks -> final RMSNorm; `lm_head_logits` maps to the vocab.

    `forward` returns hidden states, not logits: with vocabularies of tens of thousands of
    codes, the `[T, vocab]` logits are the largest activation, and heads/losses decide which
    positions need them.
    """

    def __init__(self, config: GPTConfig) -> None:
        super().__init__()
        if config.vocab_size is None:
            raise ValueError(
                "GPTConfig.vocab_size is None: set it from the vocabulary (len(Vocab.load(prepared_dir))) before building GPT"
            )
        self.config = config
        self.wte = nn.Embedding(config.vocab_size, config.n_embd)
        self.drop = nn.Dropout(config.dropout)
        self.blocks = nn.ModuleList(Block(config, i) for i in range(config.n_layer))
        self.norm = RMSNorm(config.n_embd, config.norm_eps)
        self.lm_head = nn.Linear(config.n_embd, config.vocab_size, bias=False)
        self.rope = RotaryEmbedding(config.head_dim, config.max_seq_len, config.rope_base)
        self.reset_parameters()

    # ---------------------------------------------------------------------------- init

    def reset_parameters(self) -> None:
        """(Re)initialise every weight (see `_init_weights`) and the rotary tables.

        Call it after materialising a meta-device model (`to_empty`): `to_empty` unties the
        lm head from the embedding (it replaces each module's tensors separately), which this
        re-ties, and per-module `reset_parameters` of `nn.Linear` would give PyTorch's
        default init, not this one. Call it before building the optimizer.
        """
        if self.config.tie_embeddings:
            self.lm_head.weight = self.wte.weight
        self.apply(self._init_weights)
        self.rope.reset_parameters()

    def _init_weights(self, module: nn.Module) -> None:
        """N(0, init_std) for matrices; residual output projections get std / sqrt(2 * n_layer).

        Each block adds two projections into the residual stream, so without the scaling its
        variance grows with depth (GPT-2 / nanoGPT). Norm gains start at 1.
        """
        std = self.config.init_std
        if isinstance(module, (nn.Linear, nn.Embedding)):
            if module is self.lm_head and self.config.tie_embeddings:
                return  # shares the embedding's weight, initialised once
            scaled = getattr(module, "residual_out", False)
            nn.init.normal_(module.weight, mean=0.0, std=std / math.sqrt(2 * self.config.n_layer) if scaled else std)
        elif isinstance(module, RMSNorm):
            module.reset_parameters()

    # ---------------------------------------------------------------------------- forward

    def forward(
        self,
        input_ids: Tensor,
        position_ids: Tensor | None = None,
        cu_seqlens: Tensor | None = None,
        max_seqlen: int | None = None,
        kv_cache: KVCache | SharedPrefixKVCache | None = None,
        key_mask: Tensor | None = None,
    ) -> Tensor:
        """Hidden states `[T, C]` for packed `[T]` input (needs `cu_seqlens`) or `[B, T, C]` for `[B, T]`.

        Packed: `position_ids` default to positions restarting per patient; pass `max_seqlen`
        (the longest patient, a host int) to avoid a device sync. Unpacked: positions default
        to `0..T-1` after whatever `kv_cache` already holds; the cache is advanced by T.
        `key_mask` (unpacked only): bool `[B, past + T]`, False on padding tokens, which no
        query then attends to; give left-padded rows their own `position_ids` too.
        """
        packed_mask = None
        if input_ids.dim() == 1:
            if cu_seqlens is None:
                raise ValueError(
                    "packed [T] input_ids need cu_seqlens (int32 [n_seq + 1]); pass [B, T] for unpacked sequences"
                )
            if kv_cache is not None or key_mask is not None:
                raise ValueError("kv_cache and key_mask work with unpacked [B, T] input only")
            T = input_ids.shape[0]
            backend = resolve_backend(self.config.attn_backend, input_ids.device)
            packed_mask = build_packed_mask(cu_seqlens, T, max_seqlen, backend)
            self._check_length(packed_mask.max_seqlen, position_ids)
            if position_ids is None:
                position_ids = positions_from_cu_seqlens(cu_seqlens, T)
        elif input_ids.dim() == 2:
            if cu_seqlens is not None:
                raise ValueError("cu_seqlens is for packed [T] input_ids; [B, T] rows are separate sequences already")
            # rows and cached decoding: the configured backend, or `auto` where it cannot run on this device
            backend = resolve_backend(self.config.attn_backend, input_ids.device, strict=False)
            past = kv_cache.length if kv_cache is not None else 0
            T = input_ids.shape[1]
            self._check_length(past + T, position_ids)
            if position_ids is None:
                position_ids = torch.arange(past, past + T, device=input_ids.device).expand(input_ids.shape[0], T)
            if key_mask is not None and tuple(key_mask.shape) != (input_ids.shape[0], past + T):
                raise ValueError(
                    f"key_mask must be [B, past + T] = {(input_ids.shape[0], past + T)}, got {tuple(key_mask.shape)}"
                )
        else:
            raise ValueError(f"input_ids must be packed [T] or unpacked [B, T], got shape {tuple(input_ids.shape)}")

        rope = self.rope(position_ids)
        x = self.drop(self.wte(input_ids))
        for block in self.blocks:
            x = block(x, rope, packed_mask, kv_cache, key_mask, backend)
        if kv_cache is not None:
            kv_cache.advance(input_ids.shape[1])
        return self.norm(x)

    def _check_length(self, longest: int, position_ids: Tensor | None) -> None:
        """Positions past `max_seq_len` would index past the rotary tables: fail with the reason.

        Explicit `position_ids` are checked on CPU only (on GPU the check would be a sync).
        """
        if position_ids is not None:
            if position_ids.device.type == "cpu" and position_ids.numel() and not torch.compiler.is_compiling():
                longest = int(position_ids.max()) + 1
            else:
                return
        if longest > self.config.max_seq_len:
            raise ValueError(
                f"a sequence of {longest} positions exceeds max_seq_len={self.config.max_seq_len}: crop or pack shorter sequences"
            )

    def lm_head_logits(self, h: Tensor) -> Tensor:
        """Next-token logits `[..., vocab_size]` from hidden states."""
        return self.lm_head(h)

    def new_kv_cache(
        self,
        batch_size: int,
        max_len: int | None = None,
        *,
        device: torch.device | str | None = None,
        dtype: torch.dtype | None = None,
    ) -> KVCache:
        """An empty `KVCache` sized for this model (default: `max_seq_len` tokens, model's device/dtype).

        Under bf16 autocast pass `dtype=torch.bfloat16`: the cache must match the keys' dtype.
        """
        p = self.wte.weight
        c = self.config
        return KVCache(
            c.n_layer,
            batch_size,
            max_len or c.max_seq_len,
            c.n_head,
            c.head_dim,
            device=device or p.device,
            dtype=dtype or p.dtype,
        )

    # ---------------------------------------------------------------------------- accounting

    def num_parameters(self, non_embedding: bool = True) -> int:
        """Unique parameters; `non_embedding` drops the token embedding (and an untied lm head).

        The embedding is a lookup, not compute; scaling-law N excludes it (Kaplan et al.).
        """
        n = sum(p.numel() for p in self.parameters())  # parameters() yields a tied weight once
        if non_embedding:
            n -= self.wte.weight.numel()
            if not self.config.tie_embeddings:
                n -= self.lm_head.weight.numel()
        return n

    def flops_per_token(self, seq_len: int) -> float:
        """Training FLOPs per token (forward + backward) for MFU: `6 * N + 12 * L * C * seq_len`.

        `N` counts the matmul weights every token goes through: the non-embedding parameters
        plus the lm head (`vocab * C`, a real matmul even when tied). `12 * L * C * seq_len` is
        attention's QK^T and AV (2 * 2 * C * seq_len multiply-adds per layer forward, x3 with
        backward), PaLM appendix B, counting the full (not causally halved) score matrix.
        For packed batches use the mean attended span, e.g. `sum(len_i**2) / sum(len_i)`.
        """
        c = self.config
        n = self.num_parameters(non_embedding=True) + c.vocab_size * c.n_embd
        return 6.0 * n + 12.0 * c.n_layer * c.n_embd * seq_len
