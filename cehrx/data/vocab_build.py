"""Decide the vocabulary from visit/subject/code aggregates (before any token exists) and build `vocab.json`.

Kept: all special and time tokens (so any date can be encoded), YEAR/AGE over the observed
range (a crop can start at any visit), gender/race/visit types seen in train plus UNKNOWN,
discharge and clinical codes seen in >= min_subjects train subjects, and Q1..Q<num_bins>.
Structural tokens missing from the vocabulary fall back to their UNKNOWN spelling.
"""

from __future__ import annotations

import duckdb
import numpy as np

from cehrx.data import grammar as g
from cehrx.data.duck import literal
from cehrx.data.grammar import KINDS, PREFIX, SPECIAL_TOKENS, UNKNOWN, gap_sql, kind_of, parse_time, prompt_token
from cehrx.data.vocab import Vocab

MIN_MAX_YEARS = 150  # Y gap tokens go at least this far, however short the longest gap seen in train


def seen_in_train(con: duckdb.DuckDBPyConnection, max_gap_days: int) -> dict[str, int]:
    """Train subjects per structural token, for the tokens whose spelling decides what the vocabulary keeps.

    Gender, race, visit types and discharges (kept when seen in train) and `Y<n>` gaps (the longest
    seen sets the range): computed from the visit and subject tables, before any token row exists.
    Subjects are counted per token, so the counts of disjoint sets of subjects (shards) add up.
    """
    death_days = "greatest(date_diff('day', CAST(last_t AS DATE), CAST(death AS DATE)), 0)"
    gender, race, visit, discharge = (literal(PREFIX[k]) for k in ("gender", "race", "visit", "discharge"))
    unknown = literal(UNKNOWN)
    rows = con.execute(f"""
        SELECT token, count(DISTINCT subject_id) FROM (
            SELECT subject_id, {gender} || coalesce(gender, {unknown}) AS token FROM demo_t WHERE split = 'train'
            UNION ALL SELECT subject_id, {race} || coalesce(race, {unknown}) FROM demo_t WHERE split = 'train'
            UNION ALL SELECT subject_id, {visit} || vtype FROM vis WHERE split = 'train'
            UNION ALL SELECT subject_id, {discharge} || discharge FROM vis WHERE split = 'train' AND discharge IS NOT NULL
            UNION ALL SELECT subject_id, {gap_sql("gap_days", max_gap_days)} FROM vis WHERE split = 'train' AND gap_days >= {int(max_gap_days)}
            UNION ALL SELECT subject_id, {gap_sql(death_days, max_gap_days)} FROM demo_t
                      WHERE split = 'train' AND death IS NOT NULL AND {death_days} >= {int(max_gap_days)}
        ) WHERE token IS NOT NULL GROUP BY token
    """).fetchall()
    return {t: int(n) for t, n in rows}


def vocab_inputs(con: duckdb.DuckDBPyConnection, max_gap_days: int) -> dict:
    """What the vocabulary depends on besides the kept codes: the years and largest age of any visit
    start, and `seen_in_train`. A shard reports these; the reduce combines them (min/max, sums)."""
    years = con.execute("SELECT min(year(est)), max(year(est)) FROM vis").fetchall()[0]
    max_age = con.execute(
        f"SELECT max(floor((epoch(v.est) - epoch(d.birth_ok)) / {365.25 * 86400})) FROM vis v JOIN demo_t d USING (subject_id)"
    ).fetchall()[0][0]
    return {"years": list(years), "max_age": max_age, "seen": seen_in_train(con, max_gap_days)}


def combine_inputs(parts: list[dict]) -> dict:
    """`vocab_inputs` of disjoint sets of subjects -> those of their union."""
    lows = [p["years"][0] for p in parts if p["years"][0] is not None]
    highs = [p["years"][1] for p in parts if p["years"][1] is not None]
    ages = [p["max_age"] for p in parts if p["max_age"] is not None]
    seen: dict[str, int] = {}
    for p in parts:
        for t, n in p["seen"].items():
            seen[t] = seen.get(t, 0) + int(n)
    return {
        "years": [min(lows, default=None), max(highs, default=None)],
        "max_age": max(ages, default=None),
        "seen": seen,
    }


def candidate_tokens(con: duckdb.DuckDBPyConnection, min_subjects: int, num_bins: int, max_gap_days: int) -> list[str]:
    """The vocabulary in id order, from this connection's visits, subjects and `kept_codes`."""
    kept = con.execute("SELECT code, subjects FROM kept_codes ORDER BY code").fetchall()
    return tokens_from(vocab_inputs(con, max_gap_days), kept, min_subjects, num_bins, max_gap_days)


def tokens_from(
    inputs: dict, kept: list[tuple[str, int]], min_subjects: int, num_bins: int, max_gap_days: int
) -> list[str]:
    """The vocabulary in id order: special tokens, then each kind (KINDS order), numeric order inside.

    `kept` = the kept codes with their train subjects, in code order.
    """
    years, max_age = inputs["years"], inputs["max_age"]
    seen_map = dict(inputs["seen"])
    for code, n in kept:
        seen_map[code] = max(int(n), seen_map.get(code, 0))
    seen = list(seen_map.items())
    tokens: list[str] = list(SPECIAL_TOKENS)
    if years[0] is not None:
        tokens += [prompt_token("year", y) for y in range(int(years[0]), int(years[1]) + 1)]
    tokens += [prompt_token("year", UNKNOWN)]
    tokens += [prompt_token("age", a) for a in range(int(max(max_age or 0, 0)) + 1)] + [prompt_token("age", UNKNOWN)]
    for kind in ("gender", "race", "visit"):
        tokens += sorted({t for t, _ in seen if kind_of(t) == kind} | {prompt_token(kind, UNKNOWN)})
    tokens += sorted(t for t, n in seen if kind_of(t) == "discharge" and n >= min_subjects)
    years_seen = [p[1] for t, _ in seen if (p := parse_time(t)) is not None and p[0].unit == "Y"]
    tokens += g.gap_tokens(max_gap_days, max(years_seen + [MIN_MAX_YEARS]))
    tokens += g.inpatient_time_tokens(max_gap_days)
    tokens += g.quantile_tokens(num_bins)
    tokens += [code for code, _ in kept]
    order = {k: i for i, k in enumerate(KINDS)}
    # stable sort by kind keeps the numeric order inside each kind
    return sorted(dict.fromkeys(tokens), key=lambda t: order[kind_of(t)])


def code_tables(
    con: duckdb.DuckDBPyConnection, index: dict[str, int], num_bins: int
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Per code number (cid): its token id (-1 when rare), value cut points (NaN rows without) and whether it has them."""
    n = con.execute("SELECT count(*) FROM code_ids").fetchall()[0][0]
    kept = con.execute("SELECT cid, code FROM kept_codes").fetchall()
    return code_arrays(n, kept, con.execute("SELECT cid, cuts FROM edges").fetchall(), index, num_bins)


def code_arrays(
    n: int, kept: list[tuple[int, str]], edges: list[tuple[int, list]], index: dict[str, int], num_bins: int
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """`code_tables` from `n` code numbers, the kept codes' (cid, code) and the value cuts' (cid, cuts) (the
    sharded prepare's tokenize job has them from files, without the shard's database)."""
    code_ids = np.full(n, -1, dtype=np.int32)
    for cid, code in kept:
        code_ids[cid] = index[code]
    cuts = np.full((n, max(num_bins - 1, 0)), np.nan)
    has_cuts = np.zeros(n, dtype=bool)
    for cid, row in edges:
        cuts[cid, : len(row)] = row
        has_cuts[cid] = True
    return code_ids, cuts, has_cuts


def make_vocab(
    con: duckdb.DuckDBPyConnection, tokens: list[str], counts: np.ndarray, subjects: np.ndarray, meta: dict
) -> Vocab:
    """The Vocab with train counts, descriptions (concept names) and value edges."""
    desc = dict(con.execute("SELECT code, description FROM code_meta WHERE description IS NOT NULL").fetchall())
    edges = {
        c: [lo, *cuts, hi]
        for c, cuts, lo, hi in con.execute("SELECT code, cuts, lo, hi FROM edges ORDER BY code").fetchall()
    }
    names = set(tokens)
    return Vocab(
        tokens=tokens,
        kinds=[kind_of(t) for t in tokens],
        counts=[int(x) for x in counts.tolist()],
        subjects=[int(x) for x in subjects.tolist()],
        descriptions=[describe(t, desc) for t in tokens],
        edges={c: [float(x) for x in e] for c, e in edges.items() if c in names},
        meta=meta,
    )


# GENDER//F -> the description of Gender/F (OMOP sources) or of GENDER//F itself (MEDS sources)
_SOURCE_PREFIXES = {k: (k.capitalize() + "/", PREFIX[k]) for k in ("gender", "race", "visit")}


def describe(token: str, code_desc: dict[str, str]) -> str | None:
    """Human-readable description of a token (concept names for codes).

    >>> describe("D3", {}), describe("Y4", {}), describe("i-H2", {}), describe("DISCHARGE//X/1", {"X/1": "Home"})
    ('3 days', '4 years', '2 hours inside the visit', 'discharge: Home')
    >>> describe("GENDER//F", {"Gender/F": "FEMALE"}), describe("VISIT//IP", {"Visit/IP": "Inpatient Visit"})
    ('FEMALE', 'Inpatient Visit')
    """
    kind = kind_of(token)
    if kind in g.TIME_KINDS:
        unit, n = parse_time(token)
        return f"{n} {unit.words}"
    if kind == "quantile":
        return f"value decile {token[1:]}"
    if kind == "discharge":
        code = token[len(PREFIX["discharge"]) :]
        return f"discharge: {code_desc.get(code, code)}"
    if kind == "code":
        return code_desc.get(token)
    if kind in _SOURCE_PREFIXES:  # GENDER//F -> the description of Gender/F (OMOP) or GENDER//F (MEDS)
        value = g.value_of(token)
        for prefix in _SOURCE_PREFIXES[kind]:
            if prefix + value in code_desc:
                return code_desc[prefix + value]
        return None
    return {
        g.PAD: "padding",
        g.END: "end of record",
        g.UNK: "unknown",
        g.VS: "visit start",
        g.VE: "visit end",
        g.DEATH: "death",
    }.get(token)
