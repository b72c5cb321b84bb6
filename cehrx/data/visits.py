"""Visits, and the visit every clinical event belongs to (DESIGN §4).

1. Visits come from the OMOP visit table, or for MEDS from admission/discharge code patterns.
2. An event whose visit id names an existing visit of the same subject belongs to it.
3. Otherwise it goes to a visit of that subject whose dates cover the event's date
   (the latest one starting no later than the event).
4. Otherwise it goes to a "day visit" that groups the subject's orphan events of that day.

Produces `body(eid, subject_id, time, code, numeric_value, text_value, src_table, vkey)` and
`allv(subject_id, vkey, vtype, vstart, vend, discharge, origin)`.
"""

from __future__ import annotations

import duckdb

from cehrx.data.duck import literal

# Fixed order of tables inside a visit at equal times (then code), for deterministic sequences.
TABLE_ORDER = ("condition_occurrence", "procedure_occurrence", "drug_exposure", "device_exposure", "measurement", "observation")
NON_BODY_TABLES = ("person", "visit_occurrence", "visit_discharge", "death")


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


def build_demographics(con: duckdb.DuckDBPyConnection, data_cfg) -> dict:
    """`demo(subject_id, split, birth, gender, race, death)` from the static and birth/death events."""
    gender = like_any("code", list(data_cfg.gender_codes))
    race = like_any("code", list(data_cfg.race_codes))
    con.execute(f"""
        CREATE OR REPLACE TABLE demo AS
        SELECT s.subject_id, s.split, d.birth, d.gender, d.race, d.death
        FROM subject_split s LEFT JOIN (
            SELECT subject_id,
                   min(time) FILTER (WHERE code = {literal(data_cfg.birth_code)}) AS birth,
                   arg_min({code_value('code')}, code) FILTER (WHERE {gender}) AS gender,
                   arg_min({code_value('code')}, code) FILTER (WHERE {race}) AS race,
                   min(time) FILTER (WHERE code = {literal(data_cfg.death_code)}) AS death
            FROM events GROUP BY subject_id
        ) d USING (subject_id)
    """)
    static_other = con.execute(f"""
        SELECT count(*) FROM events
        WHERE (time IS NULL OR src_table IN ('person')) AND code <> {literal(data_cfg.birth_code)} AND NOT {gender} AND NOT {race}
    """).fetchall()[0][0]
    return {"static_events_not_in_prompt": static_other}


def build_body(con: duckdb.DuckDBPyConnection, data_cfg) -> None:
    """`body`: the clinical events that become code tokens (no statics, visits, birth, death)."""
    excluded = ", ".join(literal(t) for t in NON_BODY_TABLES)
    con.execute(f"""
        CREATE OR REPLACE TABLE body AS
        SELECT row_number() OVER () AS eid, subject_id, time, CAST(time AS DATE) AS day, code, numeric_value, text_value,
               src_table, visit_id
        FROM events
        WHERE time IS NOT NULL AND coalesce(src_table, '') NOT IN ({excluded})
          AND code NOT IN ({literal(data_cfg.birth_code)}, {literal(data_cfg.death_code)})
          AND NOT {like_any('code', list(data_cfg.gender_codes))} AND NOT {like_any('code', list(data_cfg.race_codes))}
    """)


def build_source_visits(con: duckdb.DuckDBPyConnection, source: str, visit_patterns: list) -> None:
    """`src_visits(subject_id, visit_id, vtype, vstart, vend, discharge, discharge_eid)`."""
    if source == "omop":
        con.execute(f"""
            CREATE OR REPLACE TABLE src_visits AS
            SELECT v.subject_id, v.visit_id, {code_value('v.code')} AS vtype, v.time AS vstart,
                   greatest(coalesce(v.visit_end, v.time), v.time) AS vend, d.code AS discharge, NULL::BIGINT AS discharge_eid
            FROM events v LEFT JOIN (SELECT visit_id, subject_id, min(code) AS code FROM events WHERE src_table = 'visit_discharge' GROUP BY ALL) d
                 USING (subject_id, visit_id)
            WHERE v.src_table = 'visit_occurrence'
        """)
        return
    parts = []
    for p in visit_patterns:
        parts.append(f"""
            SELECT s.subject_id, {literal(p['type'])} AS vtype, s.time AS vstart, coalesce(e.time, s.time) AS vend,
                   e.code AS discharge, e.eid AS discharge_eid
            FROM (SELECT * FROM body WHERE {like_any('code', [p['start']])}) s
            ASOF LEFT JOIN (SELECT * FROM body WHERE {like_any('code', [p['end']])}) e
                 ON s.subject_id = e.subject_id AND e.time >= s.time
        """)
    union = " UNION ALL ".join(parts) if parts else (
        "SELECT NULL::BIGINT AS subject_id, NULL::VARCHAR AS vtype, NULL::TIMESTAMP AS vstart, NULL::TIMESTAMP AS vend, "
        "NULL::VARCHAR AS discharge, NULL::BIGINT AS discharge_eid WHERE false")
    con.execute(f"""
        CREATE OR REPLACE TABLE src_visits AS
        SELECT subject_id, row_number() OVER (ORDER BY subject_id, vstart, vtype, vend) AS visit_id, vtype, vstart, vend, discharge, discharge_eid
        FROM ({union})
    """)


def attach_events(con: duckdb.DuckDBPyConnection, day_visit_type: str) -> dict:
    """Give every body event a visit key `vkey`; create day visits for what no visit covers."""
    con.execute("""
        CREATE OR REPLACE TABLE allv_src AS
        SELECT subject_id, row_number() OVER (ORDER BY subject_id, vstart, vend, vtype, visit_id) AS vkey, visit_id, vtype,
               vstart, vend, CAST(vstart AS DATE) AS sday, CAST(vend AS DATE) AS eday, discharge, discharge_eid
        FROM src_visits
    """)
    # MEDS: the discharge events that close a visit become its DISCHARGE token, not a body event.
    con.execute("DELETE FROM body WHERE eid IN (SELECT discharge_eid FROM allv_src WHERE discharge_eid IS NOT NULL)")
    con.execute("""
        CREATE OR REPLACE TABLE attach AS
        SELECT b.eid, v.vkey, 'visit_id' AS how
        FROM body b JOIN allv_src v ON v.subject_id = b.subject_id AND v.visit_id = b.visit_id
        WHERE b.visit_id IS NOT NULL
    """)
    con.execute("""
        INSERT INTO attach
        SELECT b.eid, v.vkey, 'covering_visit'
        FROM body b JOIN allv_src v ON v.subject_id = b.subject_id AND b.day BETWEEN v.sday AND v.eday
        WHERE b.eid NOT IN (SELECT eid FROM attach)
        QUALIFY row_number() OVER (PARTITION BY b.eid ORDER BY (v.vstart <= b.time) DESC, v.vstart DESC, v.vkey) = 1
    """)
    offset = con.execute("SELECT coalesce(max(vkey), 0) FROM allv_src").fetchall()[0][0]
    con.execute(f"""
        CREATE OR REPLACE TABLE dayv AS
        SELECT subject_id, day, {offset} + row_number() OVER (ORDER BY subject_id, day) AS vkey, min(time) AS vstart, max(time) AS vend
        FROM body WHERE eid NOT IN (SELECT eid FROM attach) GROUP BY subject_id, day
    """)
    con.execute("""
        INSERT INTO attach SELECT b.eid, d.vkey, 'day_visit' FROM body b JOIN dayv d USING (subject_id, day)
        WHERE b.eid NOT IN (SELECT eid FROM attach)
    """)
    con.execute(f"""
        CREATE OR REPLACE TABLE allv AS
        SELECT subject_id, vkey, vtype, vstart, vend, discharge, 'visit' AS origin FROM allv_src
        UNION ALL
        SELECT subject_id, vkey, {literal(day_visit_type)}, vstart, vend, NULL, 'day_visit' FROM dayv
    """)
    con.execute("""
        CREATE OR REPLACE TABLE body AS
        SELECT b.eid, b.subject_id, b.time, b.code, b.numeric_value, b.text_value, b.src_table, a.vkey
        FROM body b JOIN attach a USING (eid)
    """)
    rows = con.execute("SELECT how, count(*) FROM attach GROUP BY 1 ORDER BY 1").fetchall()
    return {
        "events_attached": {k: v for k, v in rows},
        "visits_from_source": con.execute("SELECT count(*) FROM allv_src").fetchall()[0][0],
        "day_visits_created": con.execute("SELECT count(*) FROM dayv").fetchall()[0][0],
    }
