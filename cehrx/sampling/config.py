"""How to sample: the `sampling:` config block (`configs/sampling/default.yaml`) as one dataclass.

`task=generate` and `task=zeroshot` both read it (`SamplingConfig.from_mapping(cfg.sampling)`);
zeroshot's task config only changes two defaults (`batch_size`, `max_new_tokens`). Every key of the
block is a field here and every field but `max_days` is a key there (`max_days`, the time budget,
comes from the caller: zeroshot sets it to the outcome window's end); a key that is not a field is
an error, not silently ignored.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass, fields, replace
from typing import Any

from cehrx.errors import CehrxError

__all__ = ["CALLER_FIELDS", "SamplingConfig"]

CALLER_FIELDS = ("max_days",)  # set by the code that samples, not in the config block


@dataclass(frozen=True)
class SamplingConfig:
    """How to sample (the `sampling.*` config keys)."""

    temperature: float = 1.0  # divides the logits; 0 = greedy
    top_k: int = 0  # 0 = off
    top_p: float = 1.0  # 1.0 = off
    max_new_tokens: int | None = None  # token budget per sequence; None = until the model's context is full
    max_days: float | None = None  # time budget: stop once generated time tokens advance past this many days
    constrained: bool = True  # grammar-constrained decoding (mask tokens the grammar forbids)
    batch_size: int = 64  # sequences (prompt x sample rows) per forward batch
    seed: int = 0

    def __post_init__(self) -> None:
        if self.temperature < 0 or not math.isfinite(self.temperature):
            raise CehrxError(f"sampling temperature must be >= 0 (0 = greedy), got {self.temperature!r}")
        if self.top_k < 0:
            raise CehrxError(f"sampling top_k must be >= 0 (0 = off), got {self.top_k!r}")
        if not 0.0 < self.top_p <= 1.0:
            raise CehrxError(f"sampling top_p must be in (0, 1] (1 = off), got {self.top_p!r}")
        if self.max_new_tokens is not None and self.max_new_tokens < 1:
            raise CehrxError(f"sampling max_new_tokens must be >= 1 or null, got {self.max_new_tokens!r}")
        if self.max_days is not None and not self.max_days >= 0:
            raise CehrxError(f"sampling max_days must be >= 0 or null, got {self.max_days!r}")
        if self.batch_size < 1:
            raise CehrxError(f"sampling batch_size must be >= 1, got {self.batch_size!r}")

    @classmethod
    def from_mapping(cls, m: Any, **overrides: Any) -> SamplingConfig:
        """From the `sampling:` block (a DictConfig or dict), values coerced to the field types;
        `overrides` (e.g. a resolved `max_new_tokens`) win. Unknown keys are an error."""
        given = {**dict(m), **overrides}
        known = {f.name for f in fields(cls)}
        unknown = sorted(set(given) - known)
        if unknown:
            raise CehrxError(
                f"sampling.{unknown[0]} is not a sampling option; the options are {', '.join(sorted(known))}"
            )
        return cls(**{k: _coerce(k, v) for k, v in given.items()})

    def replace(self, **changes: Any) -> SamplingConfig:
        return replace(self, **changes)

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @property
    def untruncated(self) -> bool:
        """Draws come from the model's own distribution (temperature > 0, no top-k / top-p cut)."""
        return self.temperature > 0 and self.top_k == 0 and self.top_p >= 1.0


_TYPES = {"temperature": float, "top_k": int, "top_p": float, "max_new_tokens": int, "max_days": float}
_TYPES.update({"constrained": bool, "batch_size": int, "seed": int})


def _coerce(key: str, value: Any) -> Any:
    if value is None and key in ("max_new_tokens", "max_days"):
        return None
    try:
        return _TYPES[key](value)
    except (TypeError, ValueError) as e:
        raise CehrxError(f"sampling.{key}={value!r}: expected a {_TYPES[key].__name__}") from e
