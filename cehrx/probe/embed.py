"""Patient embeddings from a frozen GPT: the representation that the probe scores.

Histories (see `cehrx.data.history`) are packed into token-budget batches (`cu_seqlens`, no
padding, the layout the model trained on), longest first so batches are full. The feature is
the final hidden state (after the last RMSNorm) at each history's last token, which has
attended to the whole history, or the mean over its tokens (`pooling="mean"`).
"""

from __future__ import annotations

import contextlib
import sys

import numpy as np
import torch
from tqdm.auto import tqdm

from cehrx.data.history import Histories
from cehrx.data.packing import pack_lengths
from cehrx.errors import CehrxError
from cehrx.model.export import resolve_device
from cehrx.model.transformer import GPT

POOLINGS = ("last", "mean")


def embed(
    model: GPT,
    histories: Histories,
    pooling: str = "last",
    max_tokens_per_batch: int = 16384,
    device: str | torch.device | None = None,
    progress: bool = True,
) -> np.ndarray:
    """float32 `[len(histories), n_embd]` features, in the order of `histories`."""
    if pooling not in POOLINGS:
        raise CehrxError(f"probe.pooling must be one of {POOLINGS}, got {pooling!r}")
    return embed_poolings(model, histories, (pooling,), max_tokens_per_batch, device, progress)[pooling]


@torch.inference_mode()
def embed_poolings(
    model: GPT,
    histories: Histories,
    poolings: tuple[str, ...] = POOLINGS,
    max_tokens_per_batch: int = 16384,
    device: str | torch.device | None = None,
    progress: bool = True,
) -> dict[str, np.ndarray]:
    """Every readout in `poolings` from one forward pass: `{pooling: float32 [n, n_embd]}`.

    Why one pass: the forward is the whole cost, and both readouts are cheap reductions of the same
    hidden states (a study that reports both pays once; `cehrx.probe.feature_cache` stores both).
    """
    bad = [p for p in poolings if p not in POOLINGS]
    if bad or not poolings:
        raise CehrxError(f"probe.pooling must be one of {POOLINGS}, got {list(poolings)!r}")
    lengths = histories.lengths().astype(np.int64)
    if len(lengths) and lengths.max() > model.config.max_seq_len:
        raise CehrxError(
            f"a history has {int(lengths.max())} tokens but the model's max_seq_len is {model.config.max_seq_len}: lower probe.max_len"
        )
    dev = resolve_device(str(device) if device is not None else None, "probe.device")
    model = model.to(dev).eval()
    budget = max(int(max_tokens_per_batch), int(lengths.max()) if len(lengths) else 1)
    order = np.argsort(-lengths, kind="stable")
    batches = [order[b] for b in pack_lengths(lengths[order], budget)]
    out = {p: np.zeros((len(lengths), model.config.n_embd), dtype=np.float32) for p in poolings}
    autocast = torch.autocast("cuda", dtype=torch.bfloat16) if dev.type == "cuda" else contextlib.nullcontext()
    bar = tqdm(
        total=int(lengths.sum()),
        unit="tok",
        desc="embed",
        disable=not progress or not len(lengths),
        file=sys.stderr,
        mininterval=2.0,
    )
    with autocast:
        for idx in batches:
            for p, feats in _embed_batch(model, histories, idx, poolings, dev).items():
                out[p][idx] = feats
            bar.update(int(lengths[idx].sum()))
    bar.close()
    return out


def _embed_batch(
    model: GPT, h: Histories, idx: np.ndarray, poolings: tuple[str, ...], dev: torch.device
) -> dict[str, np.ndarray]:
    tokens, cu = h.packed(idx)
    ids, cu_t = torch.from_numpy(tokens).to(dev), torch.from_numpy(cu).to(dev)
    hidden = model(ids, cu_seqlens=cu_t, max_seqlen=int(np.diff(cu).max()))
    return {p: pool_hidden(hidden, cu_t, p).float().cpu().numpy() for p in poolings}


def pool_hidden(hidden: torch.Tensor, cu_seqlens: torch.Tensor, pooling: str) -> torch.Tensor:
    """`[B, C]` readout of packed hidden states `[T, C]`: the state at each sequence's last token
    (`last`), or the mean over its tokens (`mean`, accumulated in fp32). Differentiable: the
    fine-tuning head reads the representation the probe reads."""
    cu = cu_seqlens.long()
    if pooling == "last":
        return hidden[cu[1:] - 1]
    if pooling != "mean":
        raise CehrxError(f"pooling must be one of {POOLINGS}, got {pooling!r}")
    lens = cu[1:] - cu[:-1]
    seg = torch.repeat_interleave(torch.arange(len(lens), device=hidden.device), lens)
    sums = torch.zeros(len(lens), hidden.shape[-1], device=hidden.device, dtype=torch.float32).index_add(
        0, seg, hidden.float()
    )
    return sums / lens.to(torch.float32)[:, None]


def embed_unpacked(model: GPT, histories: Histories, pooling: str = "last", batch_size: int = 32) -> np.ndarray:
    """Reference path: one padded `[B, T]` batch per group, no packing (for tests of the packed path).

    Right padding with causal attention leaves the real tokens' states unchanged.
    """
    lengths = histories.lengths()
    out = np.zeros((len(lengths), model.config.n_embd), dtype=np.float32)
    with torch.inference_mode():
        for a in range(0, len(lengths), batch_size):
            idx = np.arange(a, min(a + batch_size, len(lengths)))
            T = int(lengths[idx].max())
            ids = np.zeros((len(idx), T), dtype=np.int64)
            for r, i in enumerate(idx):  # test-only reference, a loop per history is fine here
                ids[r, : lengths[i]] = histories.tokens[histories.offsets[i] : histories.offsets[i + 1]]
            hidden = model(torch.from_numpy(ids))
            for r, i in enumerate(idx):
                n = int(lengths[i])
                out[i] = (hidden[r, n - 1] if pooling == "last" else hidden[r, :n].mean(0)).float().numpy()
    return out
