"""Demographic prompts `[YEAR, AGE, GENDER, RACE]` that synthetic patients are sampled from.

By default the prompts follow the training split's empirical joint distribution: the first
`PROMPT_LEN` tokens of every train sequence are counted as one (year, age, gender, race) tuple,
and prompts are drawn with those counts as weights (so correlations between the four, e.g.
age and calendar year, are kept). Train prompts with an unknown year or age are left out: a
synthetic patient needs a birth date. A config can instead list prompts explicitly:

    generate.prompts:
      - {year: 2015, age: 60, gender: F, race: "5", weight: 2}
      - [YEAR//2019, AGE//30, GENDER//M, RACE//UNKNOWN]
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pyarrow.compute as pc

from cehrx.data.grammar import PREFIX, UNKNOWN, prompt_token
from cehrx.data.shards import PROMPT_LEN, read_split_table
from cehrx.data.vocab import PROMPT_KINDS, Vocab
from cehrx.errors import CehrxError


@dataclass
class PromptPool:
    """Distinct prompts and their weights; `draw` samples from them."""

    prompts: np.ndarray  # int32 [m, 4] token ids
    weights: np.ndarray  # float64 [m], sum 1
    source: str  # "empirical" | "config"
    excluded: int = 0  # train prompts left out (unknown year or age)

    def draw(self, n: int, rng: np.random.Generator) -> np.ndarray:
        """`n` prompts `[n, 4]` drawn with replacement by weight."""
        return self.prompts[rng.choice(len(self.prompts), size=n, p=self.weights)]

    def summary(self) -> dict:
        return {
            "source": self.source,
            "distinct": len(self.prompts),
            "excluded_unknown_year_or_age": int(self.excluded),
        }


def unknown_ids(vocab: Vocab) -> np.ndarray:
    """Ids of `YEAR//UNKNOWN` and `AGE//UNKNOWN` (those present)."""
    names = (prompt_token("year", UNKNOWN), prompt_token("age", UNKNOWN))
    return np.array([vocab[t] for t in names if t in vocab], dtype=np.int64)


def empirical_pool(prepared_dir: str | Path, vocab: Vocab) -> PromptPool:
    """The train split's (year, age, gender, race) tuples with their counts as weights.

    Only the first 4 tokens of each sequence are read (a list slice in Arrow), so this stays
    cheap on large prepared dirs.
    """
    table = read_split_table(prepared_dir, "train", columns=["tokens"])
    if table.num_rows == 0:
        raise CehrxError(f"{Path(prepared_dir) / 'tokens' / 'train'} has no sequences to draw demographic prompts from")
    heads = pc.list_slice(table.column("tokens").combine_chunks(), 0, PROMPT_LEN)
    flat = np.asarray(heads.flatten(), dtype=np.int64)
    if len(flat) != PROMPT_LEN * table.num_rows:
        raise CehrxError(
            f"a train sequence under {prepared_dir} is shorter than its {PROMPT_LEN}-token demographic prompt"
        )
    rows = flat.reshape(-1, PROMPT_LEN)
    _check_kinds(vocab, rows, f"{prepared_dir}/tokens/train")
    known = ~np.isin(rows[:, :2], unknown_ids(vocab)).any(axis=1)
    if not known.any():
        raise CehrxError(
            f"every train prompt under {prepared_dir} has an unknown year or age: give generate.prompts explicitly"
        )
    uniq, counts = np.unique(rows[known], axis=0, return_counts=True)
    return PromptPool(uniq.astype(np.int32), counts / counts.sum(), "empirical", int((~known).sum()))


def config_pool(vocab: Vocab, prompts: Sequence) -> PromptPool:
    """Prompts listed in the config: dicts (year, age, gender, race, optional weight) or 4 token strings."""
    if not prompts:
        raise CehrxError("generate.prompts is empty: give at least one prompt, or null for the train distribution")
    rows, weights = [], []
    for i, p in enumerate(prompts):
        if isinstance(p, Mapping):
            missing = [k for k in PROMPT_KINDS if k not in p]
            if missing:
                raise CehrxError(f"generate.prompts[{i}] lacks {missing} (needs year, age, gender, race)")
            names = [_token(k, p[k]) for k in PROMPT_KINDS]
            weight = float(p.get("weight", 1.0))
        elif isinstance(p, Sequence) and not isinstance(p, str) and len(p) == PROMPT_LEN:
            names, weight = [str(t) for t in p], 1.0
        else:
            raise CehrxError(
                f"generate.prompts[{i}]={p!r}: expected {{year, age, gender, race}} or 4 tokens like [YEAR//2015, AGE//60, GENDER//F, RACE//5]"
            )
        bad = [t for t in names if t not in vocab]
        if bad:
            raise CehrxError(f"generate.prompts[{i}]: {bad} not in the model's vocabulary")
        if weight <= 0:
            raise CehrxError(f"generate.prompts[{i}]: weight must be > 0, got {weight}")
        rows.append([vocab[t] for t in names])
        weights.append(weight)
    arr = np.asarray(rows, dtype=np.int64)
    _check_kinds(vocab, arr, "generate.prompts")
    if np.isin(arr[:, :2], unknown_ids(vocab)).any():
        raise CehrxError("generate.prompts: year and age must be known (a synthetic patient needs a birth date)")
    w = np.asarray(weights)
    return PromptPool(arr.astype(np.int32), w / w.sum(), "config")


def _token(kind: str, value: object) -> str:
    s = str(value)
    return s if s.startswith(PREFIX[kind]) else PREFIX[kind] + s


def _check_kinds(vocab: Vocab, rows: np.ndarray, where: str) -> None:
    """Each column must hold its kind (YEAR, AGE, GENDER, RACE)."""
    kinds = np.asarray(vocab.kinds, dtype=object)[rows]
    for j, k in enumerate(PROMPT_KINDS):
        bad = np.flatnonzero(kinds[:, j] != k)
        if len(bad):
            raise CehrxError(
                f"{where}: prompt token {j} must be a {k.upper()} token, got {vocab.tokens[rows[bad[0], j]]!r}"
            )
