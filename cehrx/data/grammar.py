"""The token grammar (DESIGN §3), declared once: token kinds and spellings, layouts, automaton.

    patient := YEAR AGE GENDER RACE  visit ( gap visit )*  [ gap [DEATH] ]  [ [END] ]
    visit   := [VS] VISIT//type  ( CODE [Q] | i-D | i-H )*  [ DISCHARGE ]  [VE]

Several places read or write tokens: prepare spells them (`tokenize`, `vocab_build`), the
vocabulary classifies them (`vocab.kind_of`), the reference checker validates sequences
(`check_sequence`) and the sampling engine masks what may come next (`sampling/constraints.Grammar`).
They all derive from the tables below, so they cannot drift apart:

- `KIND_TABLE`: the token kinds in vocabulary id order, each with how it is spelled;
- `TIME_UNITS`: the time tokens (`D`, `Y`, `i-D`, `i-H`), their kind and length in days;
- `PROMPT_KINDS` and the visit layout (`VISIT_HEAD`, `EVENT_SLOTS`, `VISIT_TAIL`, `DEATH_SLOTS`):
  the order in which `tokenize.assemble` writes a subject;
- `RULES`: the automaton over token classes (a kind, or a special token's spelling). Both
  `check_sequence` (one rule lookup per token) and `transition_table` (the `[state, token id]`
  table the sampler gathers from) interpret it.

A new token kind is one `Kind` entry (plus a `Rule` that places it, and a slot if prepare writes it).
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import TYPE_CHECKING

import numpy as np

if TYPE_CHECKING:
    from cehrx.data.vocab import Vocab

# ----------------------------------------------------------------------------------- token kinds

PAD, END, UNK, VS, VE, DEATH = "[PAD]", "[END]", "[UNK]", "[VS]", "[VE]", "[DEATH]"
SPECIAL_TOKENS = (PAD, END, UNK, VS, VE, DEATH)
UNKNOWN = "UNKNOWN"  # the value of a prompt/visit token whose value is unknown or unseen in train


@dataclass(frozen=True)
class TimeUnit:
    """A time token spelling `<unit><n>`: its kind, the days one step stands for, how to describe it."""

    unit: str
    kind: str
    days: float
    words: str


# Days per step: a year gap is 365.25 days, so dates rebuilt from gap tokens stay close (DESIGN §3).
TIME_UNITS = (
    TimeUnit("D", "gap", 1.0, "days"),
    TimeUnit("Y", "gap", 365.25, "years"),
    TimeUnit("i-D", "inpatient_time", 1.0, "days inside the visit"),
    TimeUnit("i-H", "inpatient_time", 1 / 24, "hours inside the visit"),
)
_UNIT = {u.unit: u for u in TIME_UNITS}
SECONDS_PER_DAY = 86400
SECONDS_PER_YEAR = _UNIT["Y"].days * SECONDS_PER_DAY  # the year of a `Y<n>` gap, also the year of an age


def _units_pattern(kind: str) -> str:
    return "(" + "|".join(re.escape(u.unit) for u in TIME_UNITS if u.kind == kind) + r")(\d+)"


@dataclass(frozen=True)
class Kind:
    """A token kind and its spelling: a fixed set (special), `prefix + value`, a pattern, or else (code)."""

    name: str
    prefix: str | None = None
    pattern: str | None = None
    example: str = ""


# Kinds in the order they are laid out in the vocabulary; `kind_of` tries them in this order.
KIND_TABLE = (
    Kind("special", example=VS),
    Kind("year", prefix="YEAR//", example="YEAR//1998"),
    Kind("age", prefix="AGE//", example="AGE//43"),
    Kind("gender", prefix="GENDER//", example="GENDER//F"),
    Kind("race", prefix="RACE//", example="RACE//5"),
    Kind("visit", prefix="VISIT//", example="VISIT//IP"),
    Kind("discharge", prefix="DISCHARGE//", example="DISCHARGE//<code>"),
    Kind("gap", pattern=_units_pattern("gap"), example="D12"),  # time between visits
    Kind("inpatient_time", pattern=_units_pattern("inpatient_time"), example="i-H3"),  # inside inpatient-like visits
    Kind("quantile", pattern=r"Q(\d+)", example="Q7"),  # value decile of the preceding code
    Kind("code", example="SNOMED/123"),  # clinical codes: everything else
)
KINDS = tuple(k.name for k in KIND_TABLE)
KIND_ID = {k: i for i, k in enumerate(KINDS)}  # a kind's index in KINDS, as `Vocab.kind_array` gives it
PREFIX = {k.name: k.prefix for k in KIND_TABLE if k.prefix}
TIME_KINDS = frozenset(u.kind for u in TIME_UNITS)
_PREFIXED = tuple((k.prefix, k.name) for k in KIND_TABLE if k.prefix)
_PATTERNS = tuple((re.compile(k.pattern), k.name) for k in KIND_TABLE if k.pattern)
_TIME_RE = re.compile("(" + "|".join(re.escape(u.unit) for u in TIME_UNITS) + r")(\d+)")


def kind_of(token: str) -> str:
    """The kind of a token string, from its spelling alone.

    >>> [kind_of(k.example) for k in KIND_TABLE] == list(KINDS)
    True
    """
    if token in SPECIAL_TOKENS:
        return "special"
    for prefix, kind in _PREFIXED:
        if token.startswith(prefix):
            return kind
    for pattern, kind in _PATTERNS:
        if pattern.fullmatch(token):
            return kind
    return "code"


def token_class(token: str, kind: str) -> str:
    """What the automaton sees: a special token's own spelling, else its kind."""
    return token if kind == "special" else kind


def value_of(token: str) -> str:
    """The value of a prefixed token (`VISIT//IP` -> `IP`, `DISCHARGE//X/1` -> `X/1`)."""
    return token.split("//", 1)[-1]


def int_value(token: str, kind: str) -> int | None:
    """The integer value of a `kind` token (`YEAR//1998` -> 1998); None for another kind or a value
    that is no number (`AGE//UNKNOWN`).

    >>> int_value("YEAR//1998", "year"), int_value("AGE//UNKNOWN", "age"), int_value("AGE//43", "year")
    (1998, None, None)
    """
    prefix = PREFIX[kind]
    value = token[len(prefix) :]
    return int(value) if token.startswith(prefix) and value.isdigit() else None


def unknown_fallback(token: str) -> str:
    """The spelling a token missing from the vocabulary falls back to: `PREFIX//UNKNOWN` (else `UNKNOWN`)."""
    m = re.match(r"^([A-Z]+//)", token)
    return (m.group(1) if m else "") + UNKNOWN


# ----------------------------------------------------------------------------------- time tokens


def parse_time(token: str) -> tuple[TimeUnit, int] | None:
    """`(unit, n)` of a time token, None for other tokens."""
    m = _TIME_RE.fullmatch(token)
    return None if m is None else (_UNIT[m.group(1)], int(m.group(2)))


def time_token(unit: str, n: int) -> str:
    """The time token of `n` steps of `unit` (a `TIME_UNITS` unit).

    >>> time_token("D", 0), time_token("Y", 3), time_token("i-H", 5)
    ('D0', 'Y3', 'i-H5')
    """
    return f"{_UNIT[unit].unit}{int(n)}"


def time_token_days(token: str) -> float | None:
    """Days a time token stands for (Y<n> as n*365.25, i-H<h> as h/24); None for other tokens.

    >>> time_token_days("D3"), time_token_days("Y4"), time_token_days("i-H6"), time_token_days("VISIT//IP")
    (3.0, 1461.0, 0.25, None)
    """
    parsed = parse_time(token)
    return None if parsed is None else parsed[0].days * parsed[1]


def gap_names(days: np.ndarray, max_gap_days: int) -> list[str]:
    """Gap tokens for day counts: D<n> below max_gap_days, else Y<years> (rounded half up, as `gap_sql`).

    >>> gap_names(np.array([0, 57, 1079, 1080, 2000]), 1080)
    ['D0', 'D57', 'D1079', 'Y3', 'Y5']
    """
    year = _UNIT["Y"].days
    return [
        time_token("Y", np.floor(d / year + 0.5)) if d >= max_gap_days else time_token("D", d) for d in days.tolist()
    ]


def gap_sql(days: str, max_gap_days: int) -> str:
    """`gap_names` as a DuckDB expression over a day count (DuckDB rounds half away from zero)."""
    days = f"({days})"
    year = _UNIT["Y"].days
    return f"(CASE WHEN {days} >= {int(max_gap_days)} THEN 'Y' || CAST(round({days} / {year}) AS BIGINT) ELSE 'D' || CAST({days} AS BIGINT) END)"


def gap_tokens(max_gap_days: int, max_years: int) -> list[str]:
    """Every gap token: D0..D<max_gap_days-1>, then Y from the shortest long gap to `max_years`."""
    first_year = gap_names(np.array([max_gap_days]), max_gap_days)[0]
    return [time_token("D", n) for n in range(max_gap_days)] + [
        time_token("Y", n) for n in range(parse_time(first_year)[1], max_years + 1)
    ]


def inpatient_time_codes(dt_us: np.ndarray, max_gap_days: int) -> np.ndarray:
    """Time inside an inpatient visit as an integer code: n >= 1 for i-D<n>, -h for i-H<h>, 0 for none.

    i-D<days> (capped at max_gap_days - 1) for a day or more, i-H<hours> for an hour or more.
    """
    us_per_hour = 3600 * 1_000_000
    days = np.minimum(np.floor_divide(dt_us, 24 * us_per_hour), max_gap_days - 1)
    hours = np.floor_divide(dt_us, us_per_hour)
    return np.where(dt_us >= 24 * us_per_hour, days, np.where(dt_us >= us_per_hour, -hours, 0)).astype(np.int64)


def inpatient_time_name(code: int) -> str:
    """The token of an `inpatient_time_codes` code.

    >>> inpatient_time_name(3), inpatient_time_name(-5)
    ('i-D3', 'i-H5')
    """
    return time_token("i-D", code) if code > 0 else time_token("i-H", -code)


def inpatient_time_tokens(max_gap_days: int) -> list[str]:
    """Every token `inpatient_time_codes` can give: i-D1..i-D<max_gap_days-1>, i-H1..i-H23."""
    return [inpatient_time_name(n) for n in range(1, max_gap_days)] + [inpatient_time_name(-h) for h in range(1, 24)]


def quantile_name(k: int) -> str:
    return f"Q{k}"


def quantile_tokens(num_bins: int) -> list[str]:
    return [quantile_name(k) for k in range(1, num_bins + 1)]


# --------------------------------------------------------------------------------- layouts

# The demographic prompt every sequence (and every crop or window) starts with.
PROMPT_KINDS = ("year", "age", "gender", "race")
PROMPT_LEN = len(PROMPT_KINDS)
# How `tokenize.assemble` writes a subject: the prompt, then per visit the head, per event the
# event slots, the tail; then the death slots. A slot holds a token of that class or nothing.
VISIT_HEAD = ("gap", VS, "visit")  # no gap before a subject's first visit
EVENT_SLOTS = ("inpatient_time", "code", "quantile")  # time since the previous event (inpatient-like visits)
VISIT_TAIL = ("inpatient_time", "discharge", VE)  # time from the last event to the visit end
DEATH_SLOTS = ("gap", DEATH)


def prompt_token(kind: str, value: object) -> str:
    """`YEAR//1998` from ("year", 1998); `UNKNOWN` for the unknown value."""
    return f"{PREFIX[kind]}{value}"


# ------------------------------------------------------------------------------- the automaton


@dataclass(frozen=True)
class Rule:
    """From any of `sources`, a token of class `token` leads to `target`.

    `opens_visit`: the token (a visit type) decides the inpatient flag of the visit it opens.
    `inpatient_only`: allowed only while that flag is set. `sampling_only`: in the sampler's
    table but not in the language (`check_sequence` rejects it).
    """

    sources: tuple[str, ...]
    token: str
    target: str
    opens_visit: bool = False
    inpatient_only: bool = False
    sampling_only: bool = False


PROMPT_STATES = tuple(f"prompt{i}" for i in range(PROMPT_LEN))
# States in id order (the sampler's tables index them). `free` is no grammar state: the sampler
# gives it to a prompt the grammar rejects, and leaves such a row unconstrained.
STATES = (
    *PROMPT_STATES,
    "start",
    "visit_type",
    "body",
    "after_code",
    "discharged",
    "between",
    "gap",
    "dead",
    "end",
    "free",
)
VISIT_STATES = ("body", "after_code", "discharged")  # the states that carry the inpatient flag
ACCEPTING = ("between", "dead", "end")  # a complete patient: after a visit, after death, ended
FREE = "free"
RULES = (
    *(Rule((s,), k, t) for s, k, t in zip(PROMPT_STATES, PROMPT_KINDS, (*PROMPT_STATES[1:], "start"))),
    Rule(("start", "gap"), VS, "visit_type"),
    Rule(("visit_type",), "visit", "body", opens_visit=True),
    Rule(("body", "after_code"), "code", "after_code"),
    Rule(("after_code",), "quantile", "body"),
    Rule(("body", "after_code"), "inpatient_time", "body", inpatient_only=True),
    Rule(("body", "after_code"), "discharge", "discharged"),
    Rule(("body", "after_code", "discharged"), VE, "between"),
    Rule(("between",), "gap", "gap"),
    Rule(("gap",), DEATH, "dead"),
    Rule(("between", "dead"), END, "end"),
    # a prompt that already ended may only end again, so a sampled row always has a token to draw
    Rule(("end",), END, "end", sampling_only=True),
)
_RULE = {(s, r.token): r for r in RULES if not r.sampling_only for s in r.sources}


def check_sequence(vocab: Vocab, tokens: list[int] | np.ndarray, inpatient_types: set[str] | None = None) -> str | None:
    """None when the sequence follows the grammar, else a message naming the first bad position.

    `inpatient_types`: visit types whose visits may hold i-D / i-H tokens (None: every type).
    The reference for tests and for anything that validates sequences one at a time.
    """
    state, inpatient = PROMPT_STATES[0], False
    for i, t in enumerate(tokens):
        name = vocab.tokens[t]
        rule = _RULE.get((state, token_class(name, vocab.kinds[t])))
        if rule is None and state in PROMPT_STATES:
            break  # reported below, with the whole prompt
        if rule is None:
            return f"unexpected {name} at {i} (state {state})"
        if rule.inpatient_only and not inpatient:
            return f"inpatient time token {name} at {i} inside a non-inpatient visit"
        if rule.opens_visit:
            inpatient = inpatient_types is None or value_of(name) in inpatient_types
        state = rule.target
    if state in PROMPT_STATES:
        names = [vocab.tokens[t] for t in tokens[:PROMPT_LEN]]
        return f"prompt must be {' '.join(k.upper() for k in PROMPT_KINDS)}, got {names}"
    if state not in ACCEPTING:
        return f"sequence ends inside a visit or after a gap (state {state})"
    return None


def state_id(state: str, inpatient: bool | int = 0) -> int:
    """A full state id of the sampler's tables: the base state and the inpatient flag."""
    return 2 * STATES.index(state) + int(inpatient and state in VISIT_STATES)


def state_name(state: int) -> str:
    """`body+inpatient`, `between`, ...: the name of a full state id."""
    base, flag = divmod(int(state), 2)
    return STATES[base] + ("+inpatient" if flag and STATES[base] in VISIT_STATES else "")


def transition_table(vocab: Vocab, inpatient_types: frozenset[str] | None) -> np.ndarray:
    """`next[state, token]` (int64 `[2 * len(STATES), V]`, -1 where forbidden), from `RULES`.

    Every state exists twice, once per inpatient flag (only `VISIT_STATES` carry it into their
    targets); a rule applies to both copies of its sources unless it is `inpatient_only`.
    `free` goes to itself on any token but `[PAD]`.
    """
    names = np.asarray(vocab.tokens, dtype=object)
    classes = np.array([token_class(t, k) for t, k in zip(vocab.tokens, vocab.kinds)], dtype=object)
    visit = np.array([k == "visit" for k in vocab.kinds], dtype=bool)
    opens_inpatient = visit.copy()
    if inpatient_types is not None:
        opens_inpatient &= np.array([value_of(t) in inpatient_types for t in vocab.tokens], dtype=bool)
    nxt = np.full((2 * len(STATES), len(names)), -1, dtype=np.int64)
    for rule in RULES:
        tokens = classes == rule.token
        for flag in (1,) if rule.inpatient_only else (0, 1):
            if rule.opens_visit:
                target = np.where(opens_inpatient, state_id(rule.target, 1), state_id(rule.target, 0))[tokens]
            else:
                target = state_id(rule.target, flag)
            for source in rule.sources:
                nxt[state_id(source, 0) + flag, tokens] = target
    for flag in (0, 1):
        nxt[2 * STATES.index(FREE) + flag, names != PAD] = state_id(FREE)
    return nxt
