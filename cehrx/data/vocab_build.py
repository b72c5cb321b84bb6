"""Build `vocab.json` from the token rows and map every token to its id.

Kept: all special and time tokens (so any date can be encoded), YEAR/AGE over the observed
range (a crop can start at any visit), gender/race/visit types seen in train plus UNKNOWN,
discharge and clinical codes seen in >= min_subjects train subjects, and Q1..Q<num_bins>.
Structural tokens missing from the vocabulary fall back to their UNKNOWN spelling.
"""

from __future__ import annotations

import duckdb

from cehrx.data.vocab import KINDS, SPECIAL_TOKENS, Vocab, kind_of


def _col(con: duckdb.DuckDBPyConnection, sql: str) -> list:
    return [r[0] for r in con.execute(sql).fetchall()]


def candidate_tokens(con: duckdb.DuckDBPyConnection, min_subjects: int, num_bins: int, max_gap_days: int) -> list[str]:
    train_tokens = """SELECT t.token, count(DISTINCT t.subject_id) AS n FROM tok t
                      SEMI JOIN (SELECT subject_id FROM demo WHERE split = 'train') d USING (subject_id) GROUP BY t.token"""
    years = _col(con, "SELECT DISTINCT year(est) FROM vis ORDER BY 1")
    max_age = con.execute(
        f"SELECT max(floor((epoch(v.est) - epoch(d.birth_ok)) / {365.25 * 86400})) FROM vis v JOIN demo_t d USING (subject_id)"
    ).fetchall()[0][0]
    seen = con.execute(f"SELECT token, n FROM ({train_tokens})").fetchall()
    tokens: list[str] = list(SPECIAL_TOKENS)
    if years:
        tokens += [f"YEAR//{y}" for y in range(int(years[0]), int(years[-1]) + 1)]
    tokens += ["YEAR//UNKNOWN"]
    tokens += [f"AGE//{a}" for a in range(0, int(max(max_age or 0, 0)) + 1)] + ["AGE//UNKNOWN"]
    for kind, prefix in (("gender", "GENDER//"), ("race", "RACE//"), ("visit", "VISIT//")):
        tokens += sorted({t for t, _ in seen if kind_of(t) == kind} | {f"{prefix}UNKNOWN"})
    tokens += sorted(t for t, n in seen if kind_of(t) == "discharge" and n >= min_subjects)
    max_years = max([int(t[1:]) for t, _ in seen if t.startswith("Y") and t[1:].isdigit()] + [150])
    tokens += [f"D{n}" for n in range(max_gap_days)] + [f"Y{n}" for n in range(3, max_years + 1)]
    tokens += [f"i-D{n}" for n in range(1, max_gap_days)] + [f"i-H{n}" for n in range(1, 24)]
    tokens += [f"Q{k}" for k in range(1, num_bins + 1)]
    tokens += _col(con, "SELECT code FROM kept_codes ORDER BY code")
    order = {k: i for i, k in enumerate(KINDS)}
    # stable sort by kind keeps the numeric order inside each kind
    return sorted(dict.fromkeys(tokens), key=lambda t: order[kind_of(t)])


def build_vocab(con: duckdb.DuckDBPyConnection, min_subjects: int, num_bins: int, max_gap_days: int, meta: dict) -> tuple[Vocab, dict]:
    """Create `vocab_tbl(token, id)`, map `tok.token` to `tok.id`, and return the Vocab."""
    tokens = candidate_tokens(con, min_subjects, num_bins, max_gap_days)
    con.execute("CREATE OR REPLACE TABLE vocab_tbl (token VARCHAR, id INTEGER, kind VARCHAR)")
    con.execute("INSERT INTO vocab_tbl SELECT unnest(?), unnest(?), unnest(?)",
                [tokens, list(range(len(tokens))), [kind_of(t) for t in tokens]])
    # structural tokens not in the vocabulary -> their UNKNOWN form; rare discharges are dropped.
    # Resolved once per distinct token (thousands), then joined to the token rows (millions).
    con.execute("""
        CREATE OR REPLACE TEMP TABLE tok_map AS
        SELECT d.token, d.n, coalesce(v.id, u.id) AS id, v.id IS NULL AS not_in_vocab
        FROM (SELECT token, count(*) AS n FROM tok GROUP BY token) d
        LEFT JOIN vocab_tbl v USING (token)
        LEFT JOIN vocab_tbl u ON v.id IS NULL AND u.token = regexp_extract(d.token, '^([A-Z]+//)', 1) || 'UNKNOWN'
    """)
    unknown = dict(con.execute("""
        SELECT regexp_extract(token, '^([A-Za-z]+)', 1) || ' (' || CASE WHEN id IS NULL THEN 'dropped' ELSE 'as UNKNOWN' END || ')',
               CAST(sum(n) AS BIGINT)
        FROM tok_map WHERE not_in_vocab AND token IS NOT NULL GROUP BY 1 ORDER BY 1
    """).fetchall())
    con.execute("""
        CREATE OR REPLACE TABLE tok_ids AS
        SELECT t.subject_id, t.r, t.part, t.er, t.sub, t.t, t.token, m.id
        FROM tok t JOIN tok_map m USING (token) WHERE m.id IS NOT NULL
    """)
    counts = {t: (c, s) for t, c, s in con.execute("""
        SELECT v.token, x.c, x.s FROM (
            SELECT t.id, count(*) AS c, count(DISTINCT t.subject_id) AS s FROM tok_ids t
            SEMI JOIN (SELECT subject_id FROM demo WHERE split = 'train') d USING (subject_id) GROUP BY t.id
        ) x JOIN vocab_tbl v ON v.id = x.id
    """).fetchall()}
    desc = dict(con.execute("SELECT code, description FROM code_meta WHERE description IS NOT NULL").fetchall())
    edges = {c: [lo, *cuts, hi] for c, cuts, lo, hi in con.execute("SELECT code, cuts, lo, hi FROM edges ORDER BY code").fetchall()}
    vocab = Vocab(
        tokens=tokens,
        kinds=[kind_of(t) for t in tokens],
        counts=[counts.get(t, (0, 0))[0] for t in tokens],
        subjects=[counts.get(t, (0, 0))[1] for t in tokens],
        descriptions=[describe(t, desc) for t in tokens],
        edges={c: [float(x) for x in e] for c, e in edges.items() if c in set(tokens)},
        meta=meta,
    )
    return vocab, {"structural_tokens_not_in_vocab": unknown}


_SOURCE_PREFIXES = {"gender": ("Gender/", "GENDER//"), "race": ("Race/", "RACE//"), "visit": ("Visit/", "VISIT//")}


def describe(token: str, code_desc: dict[str, str]) -> str | None:
    """Human-readable description of a token (concept names for codes).

    >>> describe("D3", {}), describe("Y4", {}), describe("i-H2", {}), describe("DISCHARGE//X/1", {"X/1": "Home"})
    ('3 days', '4 years', '2 hours inside the visit', 'discharge: Home')
    >>> describe("GENDER//F", {"Gender/F": "FEMALE"}), describe("VISIT//IP", {"Visit/IP": "Inpatient Visit"})
    ('FEMALE', 'Inpatient Visit')
    """
    kind = kind_of(token)
    if kind == "gap":
        n = int(token[1:])
        return f"{n} days" if token[0] == "D" else f"{n} years"
    if kind == "inpatient_time":
        n = int(token[3:])
        return f"{n} {'days' if token[2] == 'D' else 'hours'} inside the visit"
    if kind == "quantile":
        return f"value decile {token[1:]}"
    if kind == "discharge":
        code = token[len("DISCHARGE//"):]
        return f"discharge: {code_desc.get(code, code)}"
    if kind == "code":
        return code_desc.get(token)
    if kind in _SOURCE_PREFIXES:  # GENDER//F -> the description of Gender/F (OMOP) or GENDER//F (MEDS)
        value = token.split("//", 1)[1]
        for prefix in _SOURCE_PREFIXES[kind]:
            if prefix + value in code_desc:
                return code_desc[prefix + value]
        return None
    return {"[PAD]": "padding", "[END]": "end of record", "[UNK]": "unknown", "[VS]": "visit start",
            "[VE]": "visit end", "[DEATH]": "death"}.get(token)
