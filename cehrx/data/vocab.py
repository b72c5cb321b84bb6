"""The token vocabulary (`vocab.json`): ids, kinds, counts, descriptions and value edges.

It travels with every prepared dir and every exported model, so a model can always be read
back into clinical codes and the time grammar can be decoded without the original data.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

# The token kinds and special tokens are the grammar's (`cehrx.data.grammar`); re-exported here
# because every reader of a vocabulary needs them.
from cehrx.data.grammar import (  # noqa: F401
    DEATH,
    END,
    KIND_ID,
    KINDS,
    PAD,
    PROMPT_KINDS,
    SPECIAL_TOKENS,
    TIME_KINDS,
    UNK,
    VE,
    VS,
    kind_of,
    time_token_days,
)


@dataclass
class Vocab:
    """Token list in id order plus per-token metadata. Token id = position in `tokens`."""

    tokens: list[str]
    kinds: list[str]
    counts: list[int]  # occurrences in the train split
    subjects: list[int]  # train subjects having the token
    descriptions: list[str | None]
    edges: dict[str, list[float]] = field(default_factory=dict)  # code -> [min, q1..q9, max]
    meta: dict = field(default_factory=dict)

    def __post_init__(self) -> None:
        self.index = {t: i for i, t in enumerate(self.tokens)}
        if len(self.index) != len(self.tokens):
            raise ValueError("vocab.json has duplicate tokens")

    def __len__(self) -> int:
        return len(self.tokens)

    def __getitem__(self, token: str) -> int:
        return self.index[token]

    def __contains__(self, token: str) -> bool:
        return token in self.index

    def id(self, token: str, default: str | None = UNK) -> int:
        if token in self.index:
            return self.index[token]
        if default is None:
            raise KeyError(token)
        return self.index[default]

    @property
    def pad_id(self) -> int:
        return self.index[PAD]

    @property
    def end_id(self) -> int:
        return self.index[END]

    def ids_of_kind(self, *kinds: str) -> np.ndarray:
        """Token ids of the given kinds, e.g. to compute accuracy on code or time tokens."""
        return np.array([i for i, k in enumerate(self.kinds) if k in kinds], dtype=np.int64)

    def kind_array(self) -> np.ndarray:
        """Per-id index into KINDS, for vectorised masks (`vocab.kind_array() == KIND_ID["code"]`)."""
        return np.array([KIND_ID[k] for k in self.kinds], dtype=np.int8)

    def to_json(self) -> dict:
        return {
            "format": "cehrx.vocab/1",
            "meta": self.meta,
            "tokens": [
                {"id": i, "token": t, "kind": k, "count": c, "subjects": s, "description": d}
                for i, (t, k, c, s, d) in enumerate(
                    zip(self.tokens, self.kinds, self.counts, self.subjects, self.descriptions)
                )
            ],
            "edges": self.edges,
        }

    def save(self, path: str | Path) -> None:
        Path(path).write_text(json.dumps(self.to_json(), indent=1, sort_keys=False) + "\n")

    @classmethod
    def load(cls, path: str | Path) -> "Vocab":
        path = Path(path)
        if path.is_dir():
            path = path / "vocab.json"
        if not path.is_file():
            raise FileNotFoundError(f"no vocabulary at {path} (expected a prepared dir or a model dir with vocab.json)")
        data = json.loads(path.read_text())
        rows = data["tokens"]
        return cls(
            tokens=[r["token"] for r in rows],
            kinds=[r["kind"] for r in rows],
            counts=[r["count"] for r in rows],
            subjects=[r["subjects"] for r in rows],
            descriptions=[r["description"] for r in rows],
            edges={k: list(v) for k, v in data.get("edges", {}).items()},
            meta=data.get("meta", {}),
        )
