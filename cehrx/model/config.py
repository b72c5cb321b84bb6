"""`GPTConfig`: the model's size and options as one serialisable dataclass.

It is what Hydra instantiates from `configs/model/<name>.yaml` and what is written next to
every checkpoint (`to_dict()` is JSON-safe), so a saved model can be rebuilt without Hydra.
`vocab_size` is normally left null in yaml and filled from `vocab.json` by the training code.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from pathlib import Path
from typing import Any

# An exported model directory (`model/export.py`): `<output_dir>/model/`, finished once its config.json (the
# `GPTConfig`) exists. Here, not in export.py, so the task scaffold knows the marker without importing torch.
MODEL_SUBDIR = "model"
MARKER = "config.json"

ATTN_BACKENDS = ("auto", "sdpa", "flex", "flash_attn")


def find_multiple(n: int, k: int) -> int:
    """Smallest multiple of `k` that is >= `n` (matmul-friendly hidden sizes, as litgpt does).

    >>> find_multiple(341, 64), find_multiple(384, 64)
    (384, 384)
    """
    return n if n % k == 0 else n + k - (n % k)


def default_intermediate_size(n_embd: int) -> int:
    """SwiGLU hidden width: 8/3 * n_embd rounded up to a multiple of 64.

    SwiGLU has three matrices instead of two, so 8/3 keeps the MLP's parameter count close to a
    4x GELU MLP (LLaMA's choice).

    >>> default_intermediate_size(64), default_intermediate_size(128), default_intermediate_size(768)
    (192, 384, 2048)
    """
    return find_multiple(int(8 * n_embd / 3), 64)


RECIPE_KEYS = ("lr",)  # training-recipe values kept in the model yamls, not architecture


@dataclass
class GPTConfig:
    """Sizes and options of the decoder-only transformer (`cehrx.model.transformer.GPT`).

    `vocab_size` may be None only until the vocabulary is known: `GPT(config)` requires it.
    `intermediate_size=None` means the derived SwiGLU default (`default_intermediate_size`).
    `attn_backend` is resolved per device at run time (`cehrx.model.attention.resolve_backend`).
    """

    vocab_size: int | None = None
    n_layer: int = 4
    n_head: int = 4
    n_embd: int = 128
    max_seq_len: int = 512
    intermediate_size: int | None = None
    rope_base: float = 10000.0
    norm_eps: float = 1e-5
    dropout: float = 0.0
    attn_backend: str = "auto"
    init_std: float = 0.02
    tie_embeddings: bool = True
    name: str = "custom"

    def __post_init__(self) -> None:
        for f in ("n_layer", "n_head", "n_embd", "max_seq_len"):
            value = getattr(self, f)
            if not isinstance(value, int) or value <= 0:
                raise ValueError(f"GPTConfig.{f} must be a positive int, got {value!r}")
        if self.vocab_size is not None and (not isinstance(self.vocab_size, int) or self.vocab_size <= 0):
            raise ValueError(f"GPTConfig.vocab_size must be a positive int or None, got {self.vocab_size!r}")
        if self.n_embd % self.n_head:
            raise ValueError(
                f"GPTConfig.n_embd={self.n_embd} is not divisible by n_head={self.n_head}: "
                f"each head gets n_embd // n_head dimensions"
            )
        if self.head_dim % 2:
            raise ValueError(
                f"GPTConfig head_dim = n_embd // n_head = {self.head_dim} must be even for rotary embeddings"
            )
        if self.attn_backend not in ATTN_BACKENDS:
            raise ValueError(f"GPTConfig.attn_backend={self.attn_backend!r} is not one of {', '.join(ATTN_BACKENDS)}")
        if not 0.0 <= self.dropout < 1.0:
            raise ValueError(f"GPTConfig.dropout must be in [0, 1), got {self.dropout!r}")
        if self.intermediate_size is None:
            self.intermediate_size = default_intermediate_size(self.n_embd)
        elif self.intermediate_size <= 0:
            raise ValueError(f"GPTConfig.intermediate_size must be positive, got {self.intermediate_size!r}")

    @property
    def head_dim(self) -> int:
        return self.n_embd // self.n_head

    def to_dict(self) -> dict[str, Any]:
        """Plain JSON-safe dict of every field (derived defaults resolved)."""
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> "GPTConfig":
        """Rebuild from `to_dict()` output; an unknown key is an error, not silently dropped."""
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(data) - known - {"_target_"})
        if unknown:
            raise ValueError(f"unknown GPTConfig field(s): {', '.join(unknown)}")
        return cls(**{k: v for k, v in data.items() if k in known})

    @classmethod
    def from_recipe(cls, **kwargs: Any) -> "GPTConfig":
        """Build from a `configs/model/*.yaml` recipe, which also carries the size's learning rate.

        `model.lr` sits beside the architecture because the right rate depends on the size
        (sweeps read `cehrx -m task=pretrain model.lr=1e-4,3e-4`); it is not a model field.
        """
        return cls(**{k: v for k, v in kwargs.items() if k not in RECIPE_KEYS})

    def replace(self, **changes: Any) -> "GPTConfig":
        """A copy with some fields changed, e.g. `config.replace(vocab_size=len(vocab))`.

        `intermediate_size` was resolved at construction: pass `intermediate_size=None` too
        when changing `n_embd` to get the new derived width.
        """
        return dataclasses.replace(self, **changes)


def model_sizes() -> dict[str, dict[str, int]]:
    """`{name: {n_layer, n_embd, n_head}}` of the shipped `configs/model/*.yaml` recipes.

    Benchmarks build models of the configured sizes without composing Hydra configs.
    """
    from omegaconf import OmegaConf

    from cehrx.configs import config_dir

    out = {}
    for path in sorted((Path(config_dir()) / "model").glob("*.yaml")):
        c = OmegaConf.load(path)
        out[path.stem] = {k: int(c[k]) for k in ("n_layer", "n_embd", "n_head")}
    return out
