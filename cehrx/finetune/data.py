"""Labelled histories as packed batches for Lightning: the probe's histories, with gradients.

A batch is a token budget of whole histories (`cu_seqlens`, no padding), the layout the model
was pretrained on. Training batches are reshuffled each epoch (`PackedBatchSampler.set_epoch`,
which Lightning calls), from a seed, so a resumed run sees the same order.
"""

from __future__ import annotations

import numpy as np
import torch
from torch.utils.data import DataLoader, Dataset, Sampler

from cehrx.data.history import Histories
from cehrx.data.packing import pack_lengths


class LabelledHistories(Dataset):
    def __init__(self, hist: Histories, y: np.ndarray, rows: np.ndarray) -> None:
        self.hist, self.y, self.rows = hist, np.asarray(y, dtype=np.float32), np.asarray(rows, dtype=np.int64)

    def __len__(self) -> int:
        return len(self.rows)

    def lengths(self) -> np.ndarray:
        return self.hist.lengths()[self.rows]

    def batch(self, items: list[int]) -> dict[str, torch.Tensor | int]:
        """The packed batch of dataset items `items` (positions in `rows`)."""
        rows = self.rows[np.asarray(items, dtype=np.int64)]
        tokens, cu = self.hist.packed(rows)
        return {
            "input_ids": torch.from_numpy(tokens),
            "cu_seqlens": torch.from_numpy(cu),
            "max_seqlen": int(np.diff(cu).max()),
            "y": torch.from_numpy(self.y[rows]),
            "rows": torch.from_numpy(rows),
        }

    def __getitem__(self, i: int) -> int:
        return i  # items are positions; `batch` (the collate) gathers them in one vectorised step


class PackedBatchSampler(Sampler[list[int]]):
    """Batches of at most `budget` tokens; shuffled per epoch (seed + epoch) or longest first."""

    def __init__(self, lengths: np.ndarray, budget: int, shuffle: bool, seed: int = 0) -> None:
        self.lengths, self.budget, self.shuffle, self.seed, self.epoch = (
            np.asarray(lengths),
            int(budget),
            shuffle,
            seed,
            0,
        )
        self.budget = max(self.budget, int(self.lengths.max()) if len(self.lengths) else 1)

    def set_epoch(self, epoch: int) -> None:
        self.epoch = int(epoch)

    def _batches(self) -> list[np.ndarray]:
        if self.shuffle:
            order = np.random.default_rng(self.seed + self.epoch).permutation(len(self.lengths))
        else:
            order = np.argsort(-self.lengths, kind="stable")
        return [order[b] for b in pack_lengths(self.lengths[order], self.budget)]

    def __iter__(self):
        return iter([b.tolist() for b in self._batches()])

    def __len__(self) -> int:
        return len(self._batches())


def loader(data: LabelledHistories, budget: int, shuffle: bool, seed: int = 0) -> DataLoader:
    sampler = PackedBatchSampler(data.lengths(), budget, shuffle, seed)
    return DataLoader(data, batch_sampler=sampler, collate_fn=data.batch, num_workers=0)
