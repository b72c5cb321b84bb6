"""MEDS events with visits -> CEHR-GPT token sequences (DESIGN §4), set-based in DuckDB.

Every token becomes one row of `tok(subject_id, r, part, er, sub, token, t)`; the tuple
(r, part, er, sub) orders a subject's tokens:

    r = 0          demographic prompt          part 0..3: YEAR AGE GENDER RACE
    r = 1..n       visits, oldest first        part 0 gap, 1 [VS], 2 VISIT//type, 3 events
                                               (er = event rank; sub 0 i-D/i-H, 1 code, 2 Q<k>),
                                               4 trailing i-D/i-H to the visit end, 5 DISCHARGE, 6 [VE]
    r = n + 1      death                       part 0 gap, 1 [DEATH]

Times are made non-decreasing by construction: a visit starts no earlier than the latest end
of the visits before it, its events no earlier than its start, and its end no earlier than its
events. Gaps are computed from those same times, so dates rebuilt from gap tokens match.
"""

from __future__ import annotations

import duckdb

from cehrx.data.duck import literal
from cehrx.data.visits import table_rank

SECONDS_PER_YEAR = 365.25 * 86400


def select_codes(con: duckdb.DuckDBPyConnection, min_subjects: int) -> dict:
    """`kept_codes(code, subjects)`: codes of body events seen in >= min_subjects train subjects."""
    con.execute(f"""
        CREATE OR REPLACE TABLE kept_codes AS
        SELECT b.code, count(DISTINCT b.subject_id) AS subjects
        FROM body b JOIN demo d USING (subject_id) WHERE d.split = 'train'
        GROUP BY b.code HAVING count(DISTINCT b.subject_id) >= {int(min_subjects)}
    """)
    dropped = con.execute("SELECT count(*), count(DISTINCT code) FROM body WHERE code NOT IN (SELECT code FROM kept_codes)").fetchall()[0]
    con.execute("DELETE FROM body WHERE code NOT IN (SELECT code FROM kept_codes)")
    return {"rare_code_events_dropped": dropped[0], "rare_codes_dropped": dropped[1]}


def learn_value_edges(con: duckdb.DuckDBPyConnection, num_bins: int, min_values: int) -> int:
    """`edges(code, cuts, lo, hi)`: per-code value quantiles on the train split.

    `cuts` holds the num_bins-1 inner cut points; lo/hi the observed range, so decoding can
    sample a value inside a bin.
    """
    qs = ", ".join(repr(i / num_bins) for i in range(1, num_bins))
    con.execute(f"""
        CREATE OR REPLACE TABLE edges AS
        SELECT b.code, quantile_cont(b.numeric_value, [{qs}]) AS cuts, min(b.numeric_value) AS lo, max(b.numeric_value) AS hi
        FROM body b JOIN demo d USING (subject_id)
        WHERE d.split = 'train' AND b.numeric_value IS NOT NULL
        GROUP BY b.code HAVING count(*) >= {int(min_values)}
    """)
    return con.execute("SELECT count(*) FROM edges").fetchall()[0][0]


def order_visits(con: duckdb.DuckDBPyConnection) -> None:
    """`vis`: visits in order with effective start/end times and the day gap before each."""
    con.execute("""
        CREATE OR REPLACE TABLE vis AS
        WITH v AS (
            SELECT a.*, greatest(a.vend, coalesce(m.tmax, a.vend)) AS vend2
            FROM allv a LEFT JOIN (SELECT vkey, max(time) AS tmax FROM body GROUP BY vkey) m USING (vkey)
            WHERE a.subject_id IN (SELECT subject_id FROM demo)
        ), o AS (
            SELECT *, row_number() OVER (PARTITION BY subject_id ORDER BY vstart, vend2, vtype, vkey) AS r FROM v
        ), p AS (
            SELECT *, max(vend2) OVER (PARTITION BY subject_id ORDER BY r ROWS BETWEEN UNBOUNDED PRECEDING AND 1 PRECEDING) AS prev_end FROM o
        )
        SELECT subject_id, vkey, r, vtype, discharge, origin,
               greatest(vstart, coalesce(prev_end, vstart)) AS est,
               greatest(vend2, coalesce(prev_end, vend2)) AS eend,
               CASE WHEN prev_end IS NOT NULL THEN greatest(date_diff('day', CAST(prev_end AS DATE), CAST(vstart AS DATE)), 0) END AS gap_days
        FROM p
    """)


def gap_token(days: str, max_gap_days: int) -> str:
    """SQL: D<n> below max_gap_days, else Y<round(n/365.25)>."""
    days = f"({days})"
    return f"(CASE WHEN {days} >= {int(max_gap_days)} THEN 'Y' || CAST(round({days} / 365.25) AS BIGINT) ELSE 'D' || CAST({days} AS BIGINT) END)"


def inpatient_time_token(seconds: str, max_days: int) -> str:
    """SQL: i-D<days> for a day or more, i-H<hours> for an hour or more, else NULL."""
    seconds = f"({seconds})"
    return (f"(CASE WHEN {seconds} >= 86400 THEN 'i-D' || CAST(least(floor({seconds} / 86400), {int(max_days)}) AS BIGINT) "
            f"WHEN {seconds} >= 3600 THEN 'i-H' || CAST(floor({seconds} / 3600) AS BIGINT) END)")


def build_token_rows(con: duckdb.DuckDBPyConnection, inpatient_types: list[str], max_gap_days: int) -> dict:
    """Fill `tok` with every token of every subject (strings, before vocabulary mapping)."""
    inpatient = ", ".join(literal(str(t)) for t in inpatient_types) or "NULL"
    max_i = max_gap_days - 1
    con.execute(f"""
        CREATE OR REPLACE TABLE evr AS
        SELECT b.subject_id, v.r, v.vtype IN ({inpatient}) AS inpatient, b.code, b.numeric_value,
               greatest(b.time, v.est) AS t, v.est, v.eend,
               row_number() OVER (PARTITION BY b.vkey ORDER BY b.time, {table_rank('b.src_table')}, b.code, b.numeric_value, b.text_value) AS er
        FROM body b JOIN vis v USING (vkey)
    """)
    con.execute(f"""
        CREATE OR REPLACE TABLE tok AS
        -- visits: gap, [VS], VISIT//type, (trailing inpatient time), [VE]
        SELECT subject_id, r, 0 AS part, 0 AS er, 0 AS sub, {gap_token('gap_days', max_gap_days)} AS token, est AS t FROM vis WHERE r > 1
        UNION ALL SELECT subject_id, r, 1, 0, 0, '[VS]', est FROM vis
        UNION ALL SELECT subject_id, r, 2, 0, 0, 'VISIT//' || vtype, est FROM vis
        UNION ALL SELECT subject_id, r, 6, 0, 0, '[VE]', eend FROM vis
        -- events: code, value decile
        UNION ALL SELECT subject_id, r, 3, er, 1, code, t FROM evr
        UNION ALL SELECT e.subject_id, e.r, 3, e.er, 2,
               'Q' || CAST(1 + len(list_filter(q.cuts, lambda x: x <= e.numeric_value)) AS BIGINT), e.t
        FROM evr e JOIN edges q USING (code) WHERE e.numeric_value IS NOT NULL
    """)
    # time inside inpatient-like visits: before each event, and from the last event to the visit end
    con.execute(f"""
        INSERT INTO tok
        SELECT subject_id, r, 3, er, 0, tok, t FROM (
            SELECT subject_id, r, er, t,
                   {inpatient_time_token("epoch(t) - epoch(coalesce(lag(t) OVER (PARTITION BY subject_id, r ORDER BY er), est))", max_i)} AS tok
            FROM evr WHERE inpatient
        ) WHERE tok IS NOT NULL
    """)
    con.execute(f"""
        INSERT INTO tok
        SELECT v.subject_id, v.r, 4, 0, 0, {inpatient_time_token("epoch(v.eend) - epoch(coalesce(l.tlast, v.est))", max_i)}, v.eend
        FROM vis v LEFT JOIN (SELECT subject_id, r, max(t) AS tlast FROM evr GROUP BY ALL) l USING (subject_id, r)
        WHERE v.vtype IN ({inpatient}) AND {inpatient_time_token("epoch(v.eend) - epoch(coalesce(l.tlast, v.est))", max_i)} IS NOT NULL
    """)
    con.execute("INSERT INTO tok SELECT subject_id, r, 5, 0, 0, 'DISCHARGE//' || discharge, eend FROM vis WHERE discharge IS NOT NULL")
    _prompt_and_death(con, max_gap_days)
    return {
        "visits_tokenized": con.execute("SELECT count(*) FROM vis").fetchall()[0][0],
        "events_tokenized": con.execute("SELECT count(*) FROM evr").fetchall()[0][0],
    }


def _prompt_and_death(con: duckdb.DuckDBPyConnection, max_gap_days: int) -> None:
    con.execute(f"""
        CREATE OR REPLACE TABLE first_last AS
        SELECT v.subject_id, min(v.est) AS first_t, max(v.eend) AS last_t, max(v.r) AS n_visits
        FROM vis v GROUP BY v.subject_id
    """)
    # birth is usable when known and not after the first visit
    con.execute(f"""
        CREATE OR REPLACE TABLE demo_t AS
        SELECT d.*, f.first_t, f.last_t, f.n_visits,
               CASE WHEN d.birth <= f.first_t THEN d.birth END AS birth_ok
        FROM demo d JOIN first_last f USING (subject_id)
    """)
    con.execute(f"""
        INSERT INTO tok
        SELECT subject_id, 0, 0, 0, 0, 'YEAR//' || CAST(year(first_t) AS VARCHAR), first_t FROM demo_t
        UNION ALL SELECT subject_id, 0, 1, 0, 0,
               CASE WHEN birth_ok IS NULL THEN 'AGE//UNKNOWN'
                    ELSE 'AGE//' || CAST(CAST(floor((epoch(first_t) - epoch(birth_ok)) / {SECONDS_PER_YEAR}) AS BIGINT) AS VARCHAR) END,
               first_t FROM demo_t
        UNION ALL SELECT subject_id, 0, 2, 0, 0, 'GENDER//' || coalesce(gender, 'UNKNOWN'), first_t FROM demo_t
        UNION ALL SELECT subject_id, 0, 3, 0, 0, 'RACE//' || coalesce(race, 'UNKNOWN'), first_t FROM demo_t
        UNION ALL SELECT subject_id, n_visits + 1, 0, 0, 0,
               {gap_token("greatest(date_diff('day', CAST(last_t AS DATE), CAST(death AS DATE)), 0)", max_gap_days)},
               greatest(death, last_t) FROM demo_t WHERE death IS NOT NULL
        UNION ALL SELECT subject_id, n_visits + 1, 1, 0, 0, '[DEATH]', greatest(death, last_t) FROM demo_t WHERE death IS NOT NULL
    """)
