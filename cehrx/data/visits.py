"""Visits, and the visit every clinical event belongs to (DESIGN §4).

1. Visits come from the OMOP visit table, or for MEDS from admission/discharge code patterns.
2. An event whose visit id names an existing visit of the same subject belongs to it.
3. Otherwise it goes to a visit of that subject whose dates cover the event's date
   (the latest one starting no later than the event).
4. Otherwise it goes to a "day visit" that groups the subject's orphan events of that day. A day
   visit starts at its first event and ends at 23:59:59 of its day (not at its last event), so its
   `[VE]` never tells a prediction time inside that day whether more events follow that day.

Produces `body(subject_id, time, cid, numeric_value, trank, vkey)`, the source visits `allv_src` and
the day visits `dayv`; a visit is identified by (subject_id, vkey).
"""

from __future__ import annotations

import duckdb

from cehrx.data.duck import END_OF_DAY, literal

# Fixed order of tables inside a visit at equal times (then code), for deterministic sequences.
TABLE_ORDER = (
    "condition_occurrence",
    "procedure_occurrence",
    "drug_exposure",
    "device_exposure",
    "measurement",
    "observation",
)
DAY_KEY_BASE = 100_000_000  # day visits: vkey = max source vkey + this + days since 1970 (> 0 for any real date)


def like_any(column: str, patterns: list[str]) -> str:
    """SQL: column matches any of the LIKE patterns.

    >>> like_any("code", ["GENDER//%", "Gender/%"])
    "(code LIKE 'GENDER//%' OR code LIKE 'Gender/%')"
    """
    if not patterns:
        return "false"
    return "(" + " OR ".join(f"{column} LIKE {literal(p)}" for p in patterns) + ")"


def code_value(column: str) -> str:
    """SQL: the part of a code after its last '/', e.g. Gender/F -> F, GENDER//F -> F, Visit/IP -> IP."""
    return f"regexp_extract({column}, '([^/]*)$', 1)"


def table_rank(column: str) -> str:
    cases = " ".join(f"WHEN {literal(t)} THEN {i}" for i, t in enumerate(TABLE_ORDER))
    return f"(CASE {column} {cases} ELSE {len(TABLE_ORDER)} END)"


# What a non-body event of `events` becomes (`event_role`), in the order checked; every other event is a code token.
ROLES = ("birth", "death", "gender", "race", "visit_start", "visit_discharge", "static")


def event_role(data_cfg) -> str:
    """SQL: the role of an event of `events`: one of ROLES, or 'body' for a clinical event (a code token).

    The one definition `build_body` and `build_demographics` share, so every event has exactly one
    role and prepare.json can count each event once: events in = code tokens + the other roles + drops.
    """
    birth, death = literal(data_cfg.birth_code), literal(data_cfg.death_code)
    return f"""(CASE WHEN code = {birth} THEN 'birth' WHEN code = {death} OR src_table = 'death' THEN 'death'
        WHEN {like_any("code", list(data_cfg.gender_codes))} THEN 'gender' WHEN {like_any("code", list(data_cfg.race_codes))} THEN 'race'
        WHEN src_table = 'visit_occurrence' THEN 'visit_start' WHEN src_table = 'visit_discharge' THEN 'visit_discharge'
        WHEN time IS NULL OR src_table = 'person' THEN 'static' ELSE 'body' END)"""


def build_demographics(con: duckdb.DuckDBPyConnection, data_cfg) -> dict:
    """`demo(subject_id, split, birth, gender, race, death)` from the birth, death and static events.

    One scan of `events` (only the rows that are not code tokens are grouped) also counts the
    events of each role (`event_role`), among them the static events that do not feed the prompt.
    """
    counts = ", ".join(f"count(*) FILTER (WHERE role = {literal(r)}) AS n_{r}" for r in ROLES)
    con.execute(f"""
        CREATE OR REPLACE TEMP TABLE demo_src AS
        SELECT subject_id,
               min(time) FILTER (WHERE role = 'birth') AS birth,
               arg_min({code_value("code")}, code) FILTER (WHERE role = 'gender') AS gender,
               arg_min({code_value("code")}, code) FILTER (WHERE role = 'race') AS race,
               min(time) FILTER (WHERE role = 'death') AS death, {counts}
        FROM (SELECT subject_id, time, code, {event_role(data_cfg)} AS role FROM events) WHERE role <> 'body'
        GROUP BY subject_id
    """)
    con.execute("""
        CREATE OR REPLACE TABLE demo AS
        SELECT s.subject_id, s.split, d.birth, d.gender, d.race, d.death, coalesce(d.n_static, 0) AS static_other
        FROM subject_split s LEFT JOIN demo_src d USING (subject_id)
    """)
    sums = con.execute(f"SELECT {', '.join(f'coalesce(sum(n_{r}), 0)' for r in ROLES)} FROM demo_src").fetchall()[0]
    con.execute("DROP TABLE demo_src")
    roles = {r: int(n) for r, n in zip(ROLES, sums)}
    return {"static_events_not_in_prompt": roles["static"], "roles": roles}


def build_body(con: duckdb.DuckDBPyConnection, data_cfg) -> int:
    """`body`: the clinical events that become code tokens (`event_role` 'body'); returns how many.

    Codes become integers once: `code_ids(code, cid)` numbers every code in code order, so all
    later grouping, joining and sorting by code works on `cid`. `trank` (the table's place in
    TABLE_ORDER) orders events of equal time inside a visit. Rows are identified by DuckDB's
    `rowid` (the MEDS discharge events are deleted by it).
    """
    con.execute("""
        CREATE OR REPLACE TABLE code_ids AS
        SELECT code, CAST(row_number() OVER (ORDER BY code) - 1 AS INTEGER) AS cid FROM code_meta  -- one row per code of `events`
    """)
    con.execute(f"""
        CREATE OR REPLACE TABLE body AS
        SELECT subject_id, time, CAST(time AS DATE) AS day, c.cid, numeric_value,
               CAST({table_rank("src_table")} AS TINYINT) AS trank, visit_id
        FROM events JOIN code_ids c USING (code)
        WHERE {event_role(data_cfg)} = 'body'
    """)
    return con.execute("SELECT count(*) FROM body").fetchall()[0][0]


def build_source_visits(con: duckdb.DuckDBPyConnection, source: str, visit_patterns: list) -> None:
    """`src_visits(subject_id, visit_id, vtype, vstart, vend, discharge, discharge_eid, start_eid)`.

    `start_eid` is the body row of a MEDS start event that the visit replaces (a pattern with
    `keep_start_code: false`), NULL when the start code stays a token of its visit.
    """
    if source == "omop":
        con.execute(f"""
            CREATE OR REPLACE TABLE src_visits AS
            SELECT v.subject_id, v.visit_id, {code_value("v.code")} AS vtype, v.time AS vstart,
                   greatest(coalesce(v.visit_end, v.time), v.time) AS vend, d.code AS discharge, NULL::BIGINT AS discharge_eid,
                   NULL::BIGINT AS start_eid
            FROM events v LEFT JOIN (SELECT visit_id, subject_id, min(code) AS code FROM events WHERE src_table = 'visit_discharge' GROUP BY ALL) d
                 USING (subject_id, visit_id)
            WHERE v.src_table = 'visit_occurrence'
        """)
        return
    parts = []
    for i, p in enumerate(visit_patterns):
        start, end = like_any("c.code", [p["start"]]), like_any("c.code", [p["end"]])
        con.execute(f"""
            CREATE OR REPLACE TEMP TABLE vev_{i} AS
            SELECT *, sum(d) OVER w AS depth, row_number() OVER w AS ord
            FROM (SELECT b.rowid AS eid, b.subject_id, b.time, c.code, CASE WHEN {end} THEN -1 ELSE 1 END AS d
                  FROM body b JOIN code_ids c USING (cid) WHERE {start} OR {end})
            WINDOW w AS (PARTITION BY subject_id ORDER BY time, d, eid ROWS UNBOUNDED PRECEDING)
        """)
        parts.append(_pattern_visits_sql(p, f"vev_{i}"))
    union = (
        " UNION ALL ".join(parts)
        if parts
        else (
            "SELECT NULL::BIGINT AS subject_id, NULL::VARCHAR AS vtype, NULL::TIMESTAMP AS vstart, NULL::TIMESTAMP AS vend, "
            "NULL::VARCHAR AS discharge, NULL::BIGINT AS discharge_eid, NULL::BIGINT AS start_eid WHERE false"
        )
    )
    con.execute(f"""
        CREATE OR REPLACE TABLE src_visits AS
        SELECT subject_id, row_number() OVER (ORDER BY subject_id, vstart, vtype, vend) AS visit_id, vtype, vstart, vend, discharge,
               discharge_eid, start_eid
        FROM ({union})
    """)
    for i in range(len(visit_patterns)):
        con.execute(f"DROP TABLE vev_{i}")


def _pattern_visits_sql(p, events: str) -> str:
    """SQL: the visits of one MEDS visit pattern, start and end events paired like parentheses.

    Per subject, in time order (an end before a start at the same time, so a stay that ends when
    the next begins closes first), a start opens a level and an end closes the innermost open
    one: the end pairs with the latest start at its own nesting level. Nested stays of one type
    (a hospital stay inside a nursing-facility stay) keep both lengths, and a start with no end of
    its own (Synthea's outpatient visits, which last no time) is a zero-length visit that never
    takes a later visit's end. A code matching both patterns counts as an end. `events` holds the
    pattern's start (d = 1) and end (d = -1) events with their running `depth` and order `ord`.
    """
    keep = bool(p.get("keep_start_code", True))
    return f"""
        SELECT s.subject_id, {literal(p["type"])} AS vtype, s.time AS vstart, coalesce(m.time, s.time) AS vend,
               m.code AS discharge, m.eid AS discharge_eid, {"NULL::BIGINT" if keep else "s.eid"} AS start_eid
        FROM {events} s
        LEFT JOIN (
            SELECT e.eid, e.time, e.code, o.eid AS start_of
            FROM (SELECT eid, subject_id, time, code, ord, depth + 1 AS level FROM {events} WHERE d = -1) e
            ASOF JOIN (SELECT eid, subject_id, ord, depth AS level FROM {events} WHERE d = 1) o
                 ON o.subject_id = e.subject_id AND o.level = e.level AND o.ord <= e.ord
            QUALIFY row_number() OVER (PARTITION BY o.eid ORDER BY e.ord) = 1
        ) m ON m.start_of = s.eid
        WHERE s.d = 1
    """


def attach_events(con: duckdb.DuckDBPyConnection) -> dict:
    """Give every body event a visit key `vkey`; make day visits for what no visit covers.

    Source visits get vkey 1..n in (subject, start, end, type, id) order. A day visit's vkey is
    `DAY_KEY_BASE` + its day number: unique within the subject and ordered by day after every
    source visit, which is all the vkey is used for (with subject_id), so day visits need no
    numbering pass and no join back to their events.
    Produces `body(subject_id, time, cid, numeric_value, trank, vkey, how)`,
    `allv_src` (source visits) and `dayv` (day visits: first event to 23:59:59 of the day); drops src_visits.
    """
    con.execute("""
        CREATE OR REPLACE TABLE allv_src AS
        SELECT subject_id, row_number() OVER (ORDER BY subject_id, vstart, vend, vtype, visit_id) AS vkey, visit_id, vtype,
               vstart, vend, CAST(vstart AS DATE) AS sday, CAST(vend AS DATE) AS eday, discharge, discharge_eid, start_eid
        FROM src_visits
    """)
    con.execute("DROP TABLE src_visits")
    # MEDS: the discharge events that close a visit become its DISCHARGE token, not a body event, and so
    # do the start events of patterns with `keep_start_code: false` (their VISIT token says it all).
    starts_dropped, closed = con.execute("SELECT count(start_eid), count(discharge_eid) FROM allv_src").fetchall()[0]
    con.execute("""DELETE FROM body WHERE rowid IN (SELECT discharge_eid FROM allv_src WHERE discharge_eid IS NOT NULL
                   UNION ALL SELECT start_eid FROM allv_src WHERE start_eid IS NOT NULL)""")
    # events whose visit id does not name a visit of theirs: the covering visit that starts last
    # (preferring one started no later than the event)
    con.execute("""
        CREATE OR REPLACE TEMP TABLE cover AS
        SELECT b.rowid AS eid, v.vkey
        FROM body b ANTI JOIN allv_src m ON m.subject_id = b.subject_id AND m.visit_id = b.visit_id
        JOIN allv_src v ON v.subject_id = b.subject_id AND b.day BETWEEN v.sday AND v.eday
        QUALIFY row_number() OVER (PARTITION BY b.rowid ORDER BY (v.vstart <= b.time) DESC, v.vstart DESC, v.vkey) = 1
    """)
    base = con.execute("SELECT coalesce(max(vkey), 0) FROM allv_src").fetchall()[0][0] + DAY_KEY_BASE
    con.execute(f"""
        CREATE OR REPLACE TABLE body AS
        SELECT b.subject_id, b.time, b.cid, b.numeric_value, b.trank,
               coalesce(m.vkey, c.vkey, {base} + date_diff('day', DATE '1970-01-01', b.day)) AS vkey,
               CAST(CASE WHEN m.vkey IS NOT NULL THEN 0 WHEN c.vkey IS NOT NULL THEN 1 ELSE 2 END AS TINYINT) AS how
        FROM body b LEFT JOIN allv_src m ON m.subject_id = b.subject_id AND m.visit_id = b.visit_id
        LEFT JOIN cover c ON c.eid = b.rowid
    """)
    con.execute("DROP TABLE cover")
    # A day visit ends at the end of its day (23:59:59), not at its last event: a prediction time inside
    # that day must not learn from [VE] whether more events follow that day. `greatest` keeps the end no
    # earlier than an event inside the day's last second (23:59:59.5).
    con.execute(f"""
        CREATE OR REPLACE TABLE dayv AS
        SELECT subject_id, vkey, min(time) AS vstart, greatest(max(time), CAST(CAST(min(time) AS DATE) AS TIMESTAMP) + {END_OF_DAY}) AS vend
        FROM body WHERE how = 2 GROUP BY subject_id, vkey
    """)
    hows = dict(con.execute("SELECT how, count(*) FROM body GROUP BY how").fetchall())
    attached = {name: hows[i] for i, name in enumerate(("visit_id", "covering_visit", "day_visit")) if hows.get(i)}
    return {
        "events_attached": dict(sorted(attached.items())),
        "visits_from_source": con.execute("SELECT count(*) FROM allv_src").fetchall()[0][0],
        "day_visits_created": con.execute("SELECT count(*) FROM dayv").fetchall()[0][0],
        **({"end_codes_made_discharge_tokens": closed} if closed else {}),
        **({"start_codes_replaced_by_visit_token": starts_dropped} if starts_dropped else {}),
    }
