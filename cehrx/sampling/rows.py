"""Per-row state of a sampling run: the rows in the batch (`Rows`) and what they drew (`Record`).

A row is one `(prompt, sample)` pair; row `i * num_samples + j` is sample `j` of prompt `i`.
Everything here is a tensor over the rows in the batch: the engine advances, stops and compacts
them together, with no Python loop per row.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch
from torch import Tensor

from cehrx.sampling.samples import Samples

__all__ = ["RUNNING", "Prompts", "Record", "Rows"]

RUNNING = -1  # the stop reason of a row that is still sampling


@dataclass
class Prompts:
    """The prompts of one `Engine.sample` call, flat, with what each row needs from its prompt."""

    tokens: np.ndarray  # int64 flat
    offsets: np.ndarray  # int64 [n + 1]
    init_state: np.ndarray  # int64 [n]: the grammar state each prompt ends in
    keys: np.ndarray  # int64 [n]: each prompt's global id (its random numbers depend on it)
    num_samples: int

    def lengths(self, prompts: np.ndarray) -> np.ndarray:
        return self.offsets[prompts + 1] - self.offsets[prompts]


@dataclass
class Rows:
    """The rows in the batch, one entry each (finished rows ride along until compaction)."""

    row: Tensor  # int64 global row id (prompt * num_samples + sample)
    key: Tensor  # int64 the row's random-number key (prompt id * num_samples + sample)
    plen: Tensor  # int64 prompt length
    n: Tensor  # int64 tokens drawn so far
    secs: Tensor  # int64 seconds advanced by drawn time tokens
    visits: Tensor  # int64 visits opened by drawn tokens ([VS] drawn so far)
    state: Tensor | None  # int64 grammar state (None: unconstrained)
    alive: Tensor  # bool: still sampling

    @classmethod
    def start(
        cls, device: torch.device, rows: np.ndarray, plen: np.ndarray, prompts: Prompts, constrained: bool
    ) -> Rows:
        """Fresh rows `rows` (global ids) whose prompts have `plen` tokens."""
        ns = prompts.num_samples
        state = torch.from_numpy(prompts.init_state[rows // ns]).to(device) if constrained else None
        zeros = torch.zeros(len(rows), dtype=torch.int64, device=device)
        key = torch.from_numpy(prompts.keys[rows // ns] * ns + rows % ns).to(device)
        return cls(
            torch.from_numpy(rows).to(device),
            key,
            torch.from_numpy(plen).to(device),
            zeros,
            zeros.clone(),
            zeros.clone(),
            state,
            torch.ones(len(rows), dtype=torch.bool, device=device),
        )

    def advance(self, tok: Tensor, seconds: Tensor, grammar, vs_id: int) -> None:
        """One drawn token per row: count it, add its seconds, count a visit it opens, step the grammar."""
        self.n = self.n + 1
        self.secs = self.secs + seconds[tok]
        self.visits = self.visits + (tok == vs_id)
        if self.state is not None:
            self.state = grammar.step(self.state, tok)

    def select(self, index: Tensor) -> Rows:
        return Rows(*(None if t is None else t[index] for t in self._fields()))

    def cat(self, other: Rows) -> Rows:
        return Rows(*(None if a is None else torch.cat((a, b)) for a, b in zip(self._fields(), other._fields())))

    def _fields(self) -> tuple:
        return self.row, self.key, self.plen, self.n, self.secs, self.visits, self.state, self.alive


class Record:
    """What the rows drew and why they stopped, gathered into `Samples` at the end."""

    def __init__(self, n_rows: int, device: torch.device, watch: bool = False, controls: int = 0) -> None:
        self.watch, self.controls = watch, int(controls)
        self.stop = torch.full((n_rows,), RUNNING, dtype=torch.int8, device=device)
        self.n_out = torch.zeros(n_rows, dtype=torch.int64, device=device)
        self.secs = torch.zeros(n_rows, dtype=torch.int64, device=device)
        self.drawn: list[tuple[Tensor, Tensor, Tensor]] = []  # per step: (rows, index within the row, token)
        # per step (`Engine.draw`'s numbers, [B, C]): P(watched token) with watch_ids, then the control expectations
        self.stats: list[Tensor] = []

    def settle(self, live: Rows, tok: Tensor, reason: Tensor, bar, stats: Tensor | None = None) -> int:
        """Keep this step's tokens (and numbers); record the rows that just stopped. Returns how many did."""
        self.drawn.append((live.row, live.n - 1, tok))
        if stats is not None:
            self.stats.append(stats)
        finished = live.alive & (reason != RUNNING)
        n_fin = int(finished.sum())  # the one host sync per step
        if n_fin:
            rows = live.row[finished]
            self.stop[rows] = reason[finished].to(torch.int8)
            self.n_out[rows] = live.n[finished]
            self.secs[rows] = live.secs[finished]
            live.alive = live.alive & ~finished
            if bar is not None:
                bar.update(n_fin)
        return n_fin

    def samples(self, n_prompts: int, num_samples: int) -> Samples:
        """Flat tokens in row order (vectorised); tokens a finished row drew while riding along are dropped."""
        n_out = self.n_out.cpu().numpy()
        offsets = np.concatenate([[0], np.cumsum(n_out)]).astype(np.int64)
        tokens = np.zeros(int(offsets[-1]), dtype=np.int32)
        n_stats = int(self.watch) + self.controls
        stats = np.zeros((int(offsets[-1]), n_stats), dtype=np.float32)
        if self.drawn:
            rows, k, tok = (torch.cat(parts).cpu().numpy() for parts in zip(*self.drawn))
            keep = k < n_out[rows]
            tokens[offsets[rows[keep]] + k[keep]] = tok[keep]
            if n_stats:
                stats[offsets[rows[keep]] + k[keep]] = torch.cat(self.stats).float().cpu().numpy()[keep]
        return Samples(
            tokens=tokens,
            offsets=offsets,
            stop=self.stop.cpu().numpy(),
            elapsed_days=self.secs.cpu().numpy() / 86400.0,
            prompt_index=np.repeat(np.arange(n_prompts, dtype=np.int64), num_samples),
            watch_prob=stats[:, 0].copy() if self.watch else None,
            control_mean=stats[:, int(self.watch) :] if self.controls else None,
        )
