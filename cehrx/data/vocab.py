"""The token vocabulary (`vocab.json`): ids, kinds, counts, descriptions and value edges.

It travels with every prepared dir and every exported model, so a model can always be read
back into clinical codes and the time grammar can be decoded without the original data.
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

PAD, END, UNK, VS, VE, DEATH = "[PAD]", "[END]", "[UNK]", "[VS]", "[VE]", "[DEATH]"
SPECIAL_TOKENS = (PAD, END, UNK, VS, VE, DEATH)

# Token kinds, in the order they are laid out in the vocabulary.
KINDS = (
    "special",  # [PAD] [END] [UNK] [VS] [VE] [DEATH]
    "year",  # YEAR//1998
    "age",  # AGE//43
    "gender",  # GENDER//F
    "race",  # RACE//5
    "visit",  # VISIT//IP
    "discharge",  # DISCHARGE//<code>
    "gap",  # D<n>, Y<n>: time between visits
    "inpatient_time",  # i-D<n>, i-H<h>: time inside inpatient-like visits
    "quantile",  # Q1..Q10: value decile of the preceding code
    "code",  # clinical codes
)
TIME_KINDS = frozenset({"gap", "inpatient_time"})
PROMPT_KINDS = ("year", "age", "gender", "race")

_TIME_RE = re.compile(r"^(D|Y|i-D|i-H)(\d+)$")


def kind_of(token: str) -> str:
    """The kind of a token string, from its spelling alone.

    >>> [kind_of(t) for t in ["[VS]", "YEAR//1998", "D12", "i-H3", "Q7", "SNOMED/123"]]
    ['special', 'year', 'gap', 'inpatient_time', 'quantile', 'code']
    """
    if token in SPECIAL_TOKENS:
        return "special"
    for prefix, kind in (
        ("YEAR//", "year"),
        ("AGE//", "age"),
        ("GENDER//", "gender"),
        ("RACE//", "race"),
        ("VISIT//", "visit"),
        ("DISCHARGE//", "discharge"),
    ):
        if token.startswith(prefix):
            return kind
    m = _TIME_RE.match(token)
    if m:
        return "inpatient_time" if m.group(1).startswith("i-") else "gap"
    if re.fullmatch(r"Q\d+", token):
        return "quantile"
    return "code"


def time_token_days(token: str) -> float | None:
    """Days a time token stands for (Y<n> as n*365.25, i-H<h> as h/24); None for other tokens.

    >>> time_token_days("D3"), time_token_days("Y4"), time_token_days("i-H6"), time_token_days("VISIT//IP")
    (3.0, 1461.0, 0.25, None)
    """
    m = _TIME_RE.match(token)
    if not m:
        return None
    unit, n = m.group(1), int(m.group(2))
    return {"D": 1.0, "Y": 365.25, "i-D": 1.0, "i-H": 1 / 24}[unit] * n


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
        """Per-id index into KINDS, for vectorised masks (`vocab.kind_array() == KINDS.index("code")`)."""
        return np.array([KINDS.index(k) for k in self.kinds], dtype=np.int8)

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
