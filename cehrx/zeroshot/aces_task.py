"""An ACES task config read for zero-shot: the label predicate's codes and the label window.

Zero-shot reads a task from the same ACES config `probe` extracts its labels with
(`configs/aces/<task>.yaml`), so both answer the same question:

- **Outcome codes** come from the label predicate of the window that has `label:`. Plain
  predicates give a code (`code: X`), a list (`code: {any: [...]}`) or a regex (`code: {regex:
  ...}`, searched like ACES/polars `str.contains`); a derived `or(...)` takes the union
  (`label_specs` -> `CodeSpec`s, with their value constraints `value_min` / `value_max`).
- **Window**: the label window's start and end relative to the index timestamp, resolved
  through the window tree (`input.end`, `start + 365d`, ...). An end bound by an event
  (`start -> discharge`) has no fixed length: set `zeroshot.window_days` (`label_window` -> `Window`).
"""

from __future__ import annotations

import logging
import math
from dataclasses import dataclass, field
from datetime import timedelta
from pathlib import Path
from typing import Any

from cehrx.errors import CehrxError

log = logging.getLogger("cehrx.zeroshot")

INF = math.inf


@dataclass
class Window:
    """Outcome window in days after the prediction time: `(start_days, end_days]` by default.

    `end_days=inf` leaves time unbounded (then `visits` must bound it). `visits=N`: only the
    rest of the current visit and the next N visits count.
    """

    start_days: float = 0.0
    end_days: float = INF
    start_inclusive: bool = False
    end_inclusive: bool = True
    visits: int | None = None

    def __post_init__(self) -> None:
        if self.end_days <= self.start_days:
            raise CehrxError(f"outcome window ends ({self.end_days} days) before it starts ({self.start_days} days)")
        if math.isinf(self.end_days) and self.visits is None:
            raise CehrxError("outcome window has no end: set zeroshot.window_days or zeroshot.window_visits")
        if self.visits is not None and self.visits < 1:
            raise CehrxError(f"zeroshot.window_visits={self.visits} must be >= 1")


@dataclass
class CodeSpec:
    """One plain ACES predicate: an exact code, a list, or a regex, with an optional value range."""

    exact: list[str] = field(default_factory=list)
    regex: str | None = None
    value_min: float | None = None
    value_max: float | None = None
    min_inclusive: bool = True
    max_inclusive: bool = True

    @property
    def has_value(self) -> bool:
        return self.value_min is not None or self.value_max is not None


def load_aces(path: Path) -> Any:
    """`aces.config.TaskExtractorConfig` of a task file, errors naming the file."""
    from aces.config import TaskExtractorConfig

    if not path.is_file():
        raise CehrxError(f"no ACES task config at {path}")
    logging.getLogger("aces.config").setLevel(logging.WARNING)  # it logs every parsing step at INFO
    try:
        return TaskExtractorConfig.load(path)
    except Exception as e:  # ACES raises ValueError/KeyError/... for malformed configs
        raise CehrxError(f"{path}: not a valid ACES task config ({type(e).__name__}: {e})") from e


def label_specs(task: Any, path: Path) -> tuple[str, list[CodeSpec]]:
    """The label predicate's name and its plain predicates (a derived `or` is flattened)."""
    labels = [(n, w.label) for n, w in task.windows.items() if w.label]
    if not labels:
        raise CehrxError(
            f"{path}: no window has a `label:` predicate, so there is no outcome (set zeroshot.outcome_codes)"
        )
    name = labels[0][1]
    return name, _flatten(task, name, path)


def _flatten(task: Any, name: str, path: Path) -> list[CodeSpec]:
    plain, derived = task.plain_predicates, task.derived_predicates
    if name in plain:
        return [_spec(plain[name], path, name)]
    if name in derived:
        d = derived[name]
        if not d.is_or:
            raise CehrxError(
                f"{path}: label predicate {name!r} is {d.expr!r}; only or(...) maps to outcome tokens (set zeroshot.outcome_codes)"
            )
        return [s for child in d.input_predicates for s in _flatten(task, child, path)]
    raise CehrxError(f"{path}: label predicate {name!r} is not a code predicate (set zeroshot.outcome_codes)")


def _spec(p: Any, path: Path, name: str) -> CodeSpec:
    code = p.code
    spec = CodeSpec(
        value_min=p.value_min,
        value_max=p.value_max,
        min_inclusive=p.value_min_inclusive is not False,
        max_inclusive=p.value_max_inclusive is not False,
    )
    if isinstance(code, str):
        spec.exact = [code]
    elif isinstance(code, dict) and "any" in code:
        spec.exact = [str(c) for c in code["any"]]
    elif isinstance(code, dict) and "regex" in code:
        spec.regex = str(code["regex"])
    else:
        raise CehrxError(
            f"{path}: predicate {name!r} has code {code!r}: expected a code, {{any: [...]}} or {{regex: ...}}"
        )
    if p.other_cols:
        log.warning(
            "%s: predicate %r also filters on %s; zero-shot matches codes and values only",
            path,
            name,
            sorted(p.other_cols),
        )
    return spec


def label_window(task: Any, path: Path) -> Window:
    """The label window relative to the index timestamp (days), through the window tree."""
    windows = task.windows
    label_w = next(n for n, w in windows.items() if w.label)
    index = [(n, w.index_timestamp) for n, w in windows.items() if w.index_timestamp]
    if not index:
        raise CehrxError(f"{path}: no window has index_timestamp (the prediction time); set zeroshot.window_days")
    resolver = _Resolver(windows, path)
    t0 = resolver.time(*index[0])
    start, end = resolver.time(label_w, "start") - t0, resolver.time(label_w, "end") - t0
    w = windows[label_w]
    if math.isnan(end) or math.isinf(end):
        raise CehrxError(
            f"{path}: window {label_w!r} ends at an event ({w.end!r}), not after a fixed time: set zeroshot.window_days"
        )
    if math.isnan(start) or math.isinf(start):
        start = 0.0
    if start < 0:
        raise CehrxError(
            f"{path}: window {label_w!r} starts {-start:g} days before the prediction time: zero-shot only sees the future"
        )
    return Window(
        start_days=start, end_days=end, start_inclusive=bool(w.start_inclusive), end_inclusive=bool(w.end_inclusive)
    )


class _Resolver:
    """Times (days from the trigger) of window boundaries: NaN when bound by an event, +-inf for the record."""

    def __init__(self, windows: dict[str, Any], path: Path) -> None:
        self.windows, self.path, self.seen = windows, path, set()

    def time(self, window: str, end: str) -> float:
        if window not in self.windows:
            raise CehrxError(f"{self.path}: window boundary refers to unknown window {window!r}")
        key = (window, end)
        if key in self.seen:
            raise CehrxError(f"{self.path}: window boundaries of {window!r} refer to each other in a cycle")
        self.seen.add(key)
        try:
            w = self.windows[window]
            parsed = w._parsed_start if end == "start" else w._parsed_end
            return self._boundary(window, parsed)
        finally:
            self.seen.discard(key)

    def _boundary(self, window: str, parsed: dict[str, Any]) -> float:
        if parsed["event_bound"]:
            bound = parsed["event_bound"].lstrip("-")
            return -INF if bound == "_RECORD_START" else INF if bound == "_RECORD_END" else math.nan
        ref = parsed["referenced"]
        if ref == "trigger":
            base = 0.0
        elif ref in ("start", "end"):
            base = self.time(window, ref)
        else:
            other, which = ref.split(".")
            base = self.time(other, which)
        return base + _days(parsed["offset"])


def _days(offset: str | None) -> float:
    from aces.utils import parse_timedelta

    if not offset:
        return 0.0
    neg = offset.strip().startswith("-")
    td: timedelta = parse_timedelta(offset.strip().lstrip("-").strip())
    return (-1 if neg else 1) * td.total_seconds() / 86400
