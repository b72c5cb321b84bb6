"""Drawing tokens: one inverse-CDF draw per row, with numbers that do not depend on batching.

`sample_next` turns logits into token ids (temperature, top-k, top-p). `row_uniforms` gives the
uniform number of each (row, step) from a hash of the seed, the row's global id and its step,
so a row draws the same future whatever else shares its batch: the engine can refill finished
rows with new prompts, use any batch size, or recompute without a cache, and still give the
same samples for the same seed.
"""

from __future__ import annotations

import torch
from torch import Tensor

from cehrx.data.hashing import GOLDEN, MIX1, MIX2

__all__ = ["row_uniforms", "sample_next"]

# splitmix64 constants (`cehrx.data.hashing`) as signed int64: torch has no uint64 arithmetic
_GOLDEN, _MIX1, _MIX2 = (c - (1 << 64) for c in (GOLDEN, MIX1, MIX2))


def _shr(x: Tensor, s: int) -> Tensor:
    """Logical right shift of int64 (`>>` on a signed tensor copies the sign bit)."""
    return (x >> s) & ((1 << (64 - s)) - 1)


def _splitmix(x: Tensor) -> Tensor:
    """`cehrx.data.hashing.splitmix64` on int64 tensors (multiplication wraps modulo 2**64)."""
    x = x + _GOLDEN
    x = (x ^ _shr(x, 30)) * _MIX1
    x = (x ^ _shr(x, 27)) * _MIX2
    return x ^ _shr(x, 31)


def row_uniforms(seed: int, rows: Tensor, steps: Tensor) -> Tensor:
    """float32 uniforms in [0, 1), one per (row, step): splitmix64 of (seed, row), then of step.

    >>> u = row_uniforms(0, torch.tensor([0, 1, 0]), torch.tensor([0, 0, 1]))
    >>> bool(((u >= 0) & (u < 1)).all()), len(set(u.tolist())), bool(torch.equal(u, row_uniforms(0, torch.tensor([0, 1, 0]), torch.tensor([0, 0, 1]))))
    (True, 3, True)
    """
    seed_key = _splitmix(torch.tensor(int(seed) & ((1 << 63) - 1), dtype=torch.int64, device=rows.device))
    x = _splitmix(_splitmix(rows.long() ^ seed_key) + steps.long())
    return _shr(x, 40).float() * (1.0 / (1 << 24))


def sample_next(
    logits: Tensor,
    temperature: float,
    top_k: int,
    top_p: float,
    generator: torch.Generator | None = None,
    uniform: Tensor | None = None,
) -> Tensor:
    """Token ids `[B]` drawn from `logits` (`[B, V]`, float, -inf = forbidden).

    Temperature 0 is greedy. top-k keeps the k largest logits; top-p then keeps the smallest
    set of most probable tokens whose probability reaches `top_p` (renormalised after top-k,
    as Hugging Face does; the token that crosses `top_p` is kept, so one always survives).

    Why not `torch.multinomial` and a full sort: on CPU both cost far more than the model's
    own step at realistic vocabularies (multinomial draws V random numbers per row; a
    `[256, 30000]` sort takes longer than a forward of the base model). Here a row costs one
    uniform number and a `searchsorted` in its cumulative distribution, and top-p sorts only
    the top-k tokens that hold `top_p` of the mass (k grows x4 until they do, exact).
    `uniform` (`[B]`, in [0, 1)) gives each row its number (see `row_uniforms`); without it
    they come from `generator`.
    """
    if temperature == 0:
        return logits.argmax(-1)
    if temperature != 1.0:
        logits = logits / temperature
    V = logits.shape[-1]
    if 0 < top_k < V:
        vals, idx = torch.topk(logits, top_k, dim=-1)  # sorted, descending
        probs = torch.softmax(vals, dim=-1)
        if top_p < 1.0:
            probs = _nucleus(probs, top_p)
        return idx.gather(-1, _draw(probs, generator, uniform)[:, None])[:, 0]
    probs = torch.softmax(logits, dim=-1)
    if top_p < 1.0:
        k = min(V, 64)
        while True:
            vals, idx = torch.topk(probs, k, dim=-1)
            if k == V or bool((vals.sum(-1) >= top_p).all()):
                break
            k = min(V, 4 * k)
        return idx.gather(-1, _draw(_nucleus(vals, top_p), generator, uniform)[:, None])[:, 0]
    return _draw(probs, generator, uniform)


def _nucleus(sorted_probs: Tensor, top_p: float) -> Tensor:
    """Zero the tokens (probabilities sorted descending) after the mass before them reaches top_p."""
    before = sorted_probs.cumsum(-1) - sorted_probs
    return sorted_probs.masked_fill(before >= top_p, 0.0)


def _draw(probs: Tensor, generator: torch.Generator | None, uniform: Tensor | None = None) -> Tensor:
    """Inverse-CDF draw, one uniform per row, from non-negative (unnormalised) weights `[B, V]`.

    `searchsorted(..., right=True)` returns the first token whose cumulative weight exceeds the
    uniform, which always has a positive weight: a forbidden (zero) token never comes out. The
    clamp handles the float edge where `u * total` rounds up to `total`.
    """
    cdf = probs.cumsum(-1)
    total = cdf[:, -1:].contiguous()
    u = (
        torch.rand(total.shape, generator=generator, device=probs.device, dtype=cdf.dtype)
        if uniform is None
        else uniform.to(cdf.dtype)[:, None]
    )
    u = u * total
    idx = torch.searchsorted(cdf, u, right=True)
    return torch.minimum(idx, torch.searchsorted(cdf, total))[
        :, 0
    ]  # first index reaching the total: the last weighted token
