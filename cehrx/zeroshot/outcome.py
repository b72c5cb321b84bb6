"""The zero-shot outcome: which tokens mark it and the window after the prediction time.

`resolve_outcome` reads the task's ACES config (`aces_task.py`: the label predicate's `CodeSpec`s
and the label `Window`), adds the outcome codes' descendants (`descendants.py`), and maps codes to
tokens here:

- A code is a token when the vocabulary has it; `MEDS_DEATH` is `[DEATH]`, `Visit/<type>` is
  `VISIT//<type>`, a discharge code is `DISCHARGE//<code>` (`source_names`). A value constraint
  (`value_min`, `value_max`) keeps the code only when the `Q<k>` token after it names a decile
  whose midpoint satisfies it (`allowed_deciles`).
- `Outcome.descendants` says which hierarchy was consulted (OMOP, MEDS, or none).

`zeroshot.outcome_codes` / `zeroshot.window_days` override the ACES config (or replace it when
there is none); `zeroshot.window_visits: N` adds "within the next N visits".
"""

from __future__ import annotations

import logging
import math
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from cehrx.data.grammar import quantile_name, value_of
from cehrx.data.vocab import DEATH, Vocab
from cehrx.errors import CehrxError
from cehrx.probe.labels import task_config_path
from cehrx.zeroshot.aces_task import INF, CodeSpec, Window, label_specs, label_window, load_aces
from cehrx.zeroshot.descendants import descendant_codes

log = logging.getLogger("cehrx.zeroshot")


@dataclass
class Outcome:
    """Outcome tokens plus window. `allowed_q[t]` lists the Q tokens that must follow token t
    (value constraints); tokens without an entry match on their own."""

    name: str
    codes: list[str]  # source codes requested (before descendants)
    token_ids: np.ndarray  # int64, sorted: every token that marks the outcome
    window: Window
    allowed_q: dict[int, np.ndarray] = field(default_factory=dict)
    descendants: str = "none"  # hierarchy consulted: omop_concept_ancestor | meds_parent_codes | none
    unmatched: list[str] = field(default_factory=list)  # requested codes with no token

    def describe(self, vocab: Vocab) -> dict[str, Any]:
        """JSON-friendly summary for metrics.json and the report."""
        w = self.window
        return {
            "name": self.name,
            "codes": self.codes,
            "tokens": [vocab.tokens[i] for i in self.token_ids],
            "value_constrained": {vocab.tokens[t]: [vocab.tokens[q] for q in qs] for t, qs in self.allowed_q.items()},
            "descendants": self.descendants,
            "unmatched_codes": self.unmatched,
            "window": {
                "start_days": w.start_days,
                "end_days": None if math.isinf(w.end_days) else w.end_days,
                "start_inclusive": w.start_inclusive,
                "end_inclusive": w.end_inclusive,
                "visits": w.visits,
            },
        }


def source_names(vocab: Vocab) -> list[tuple[str, ...]]:
    """Per token id, the MEDS codes it stands for (empty for structural tokens)."""
    out: list[tuple[str, ...]] = []
    for tok, kind in zip(vocab.tokens, vocab.kinds):
        if kind == "code":
            out.append((tok,))
        elif kind == "visit":
            out.append((tok, f"Visit/{value_of(tok)}"))
        elif kind == "discharge":
            out.append((value_of(tok),))
        elif tok == DEATH:
            out.append(("MEDS_DEATH",))
        else:
            out.append(())
    return out


def match_tokens(
    vocab: Vocab, specs: list[CodeSpec], extra_codes: set[str] | None = None
) -> tuple[dict[int, CodeSpec | None], list[str]]:
    """Token id -> the spec it matched (None when matched via `extra_codes`, e.g. a descendant);
    plus the exact codes that matched no token."""
    names = source_names(vocab)
    hits: dict[int, CodeSpec | None] = {}
    for spec in specs:
        rx = re.compile(spec.regex) if spec.regex else None
        exact = set(spec.exact)
        for t, ns in enumerate(names):
            if any(n in exact for n in ns) or (rx is not None and any(rx.search(n) for n in ns)):
                hits[t] = spec
    for t, ns in enumerate(names):
        if extra_codes and t not in hits and any(n in extra_codes for n in ns):
            hits[t] = None
    found = {n for t in hits for n in names[t]}
    unmatched = sorted({c for s in specs for c in s.exact} - found)
    return hits, unmatched


def allowed_deciles(vocab: Vocab, token: int, spec: CodeSpec) -> np.ndarray:
    """Q token ids whose decile midpoint satisfies the spec's value range (none when the code has no edges)."""
    edges = np.asarray(vocab.edges.get(vocab.tokens[token], []), dtype=float)
    if len(edges) < 2:
        return np.zeros(0, dtype=np.int64)
    mid = (edges[:-1] + edges[1:]) / 2
    ok = np.ones(len(mid), dtype=bool)
    if spec.value_min is not None:
        ok &= mid >= spec.value_min if spec.min_inclusive else mid > spec.value_min
    if spec.value_max is not None:
        ok &= mid <= spec.value_max if spec.max_inclusive else mid < spec.value_max
    names = [quantile_name(k + 1) for k in np.flatnonzero(ok)]
    return np.array([vocab[q] for q in names if q in vocab], dtype=np.int64)


def resolve_outcome(
    vocab: Vocab,
    task: str | None,
    outcome_codes: list[str] | None = None,
    window_days: float | None = None,
    window_visits: int | None = None,
    prepared_dir: Path | None = None,
    include_descendants: bool = True,
) -> Outcome:
    """The outcome of a task (ACES config) with the explicit overrides applied."""
    specs: list[CodeSpec] = []
    window: Window | None = None
    name = task or "custom"
    if task:
        path = task_config_path(task)
        aces = load_aces(path)
        if not outcome_codes:
            name, specs = label_specs(aces, path)
            name = f"{task}:{name}"
        if window_days is None and not window_visits:
            window = label_window(aces, path)
        elif window_days is None:
            try:
                w = label_window(aces, path)
                window = Window(w.start_days, w.end_days, w.start_inclusive, w.end_inclusive, window_visits)
            except CehrxError:
                window = Window(visits=window_visits)
    if outcome_codes:
        specs = [CodeSpec(exact=[str(c) for c in outcome_codes])]
    if not specs:
        raise CehrxError(
            "no outcome: pass probe.task=<name> (configs/aces/<name>.yaml) or zeroshot.outcome_codes=[...]"
        )
    if window is None:
        window = Window(end_days=float(window_days) if window_days is not None else INF, visits=window_visits)
    elif window_visits and window.visits is None:
        window.visits = int(window_visits)
    return _build(vocab, name, specs, window, prepared_dir if include_descendants else None)


def _build(vocab: Vocab, name: str, specs: list[CodeSpec], window: Window, prepared_dir: Path | None) -> Outcome:
    exact = sorted({c for s in specs for c in s.exact})
    first, _ = match_tokens(vocab, specs)
    matched_codes = sorted({n for t in first for n in source_names(vocab)[t]} | set(exact))
    extra, how = descendant_codes(matched_codes, prepared_dir)
    hits, unmatched = match_tokens(vocab, specs, extra)
    allowed: dict[int, np.ndarray] = {}
    for t, spec in hits.items():
        if spec is not None and spec.has_value:
            allowed[t] = allowed_deciles(vocab, t, spec)
    tokens = np.array(sorted(hits), dtype=np.int64)
    if not len(tokens):
        raise CehrxError(
            f"outcome {name}: none of the codes {exact or [s.regex for s in specs]} is in the model's vocabulary "
            "(too rare in training, or spelled differently); check vocab.json"
        )
    if unmatched:
        log.warning("outcome %s: codes not in the vocabulary (never predicted): %s", name, unmatched)
    requested = exact or [f"regex:{s.regex}" for s in specs if s.regex]
    return Outcome(name, requested, tokens, window, allowed, how, unmatched)
