"""What `Engine.sample` returns: the continuations, flat, and why each stopped."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

__all__ = ["STOP_DEATH", "STOP_END", "STOP_NAMES", "STOP_TIME", "STOP_TOKENS", "Samples"]

STOP_END, STOP_DEATH, STOP_TOKENS, STOP_TIME = 0, 1, 2, 3
STOP_NAMES = ("end", "death", "tokens", "time")


@dataclass
class Samples:
    """Generated continuations, flat: sample i is `tokens[offsets[i]:offsets[i+1]]`."""

    # int32 flat: generated tokens only (prompt excluded); the stop token or the crossing time token included
    tokens: np.ndarray
    offsets: np.ndarray  # int64 [n+1]
    stop: np.ndarray  # int8 [n] STOP_* reason
    elapsed_days: np.ndarray  # float64 [n] days advanced by generated time tokens (incl. the crossing one)
    prompt_index: np.ndarray  # int64 [n] which prompt each sample continues
    # float32 like tokens: P(the step's draw is a watched token) (`watch_ids`), else None
    watch_prob: np.ndarray | None = None
    # float32 [len(tokens), K]: each step's expected control-basis row (`Engine(control_basis=...)`), else None
    control_mean: np.ndarray | None = None

    def __len__(self) -> int:
        return len(self.stop)

    def lengths(self) -> np.ndarray:
        return np.diff(self.offsets)

    def sequence(self, i: int) -> np.ndarray:
        return self.tokens[self.offsets[i] : self.offsets[i + 1]]

    def stop_counts(self) -> dict[str, int]:
        """Samples per stop reason, e.g. for `generate.json`."""
        return {name: int((self.stop == i).sum()) for i, name in enumerate(STOP_NAMES)}
