"""MEDS events with visits -> subjects, visits and events in token order, out of DuckDB (`Ordered`).

The first half of tokenizing (`tokenize.py` is the second: token ids laid out with numpy):
`select_codes` keeps the codes of enough train subjects, `learn_value_edges` the value deciles,
`order_visits` puts every visit in order with its effective start and end and the day gap before
it, and `fetch_ordered` reads subjects, visits and events back in token order (split,
subject_id, visit rank, time, table, code, value), as integer/float columns, one sort each
(`save_ordered`/`load_ordered` keep them between the sharded prepare's visits and tokenize jobs).
"""

from __future__ import annotations

from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path

import duckdb
import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.ipc as ipc

from cehrx.data import grammar as g
from cehrx.data.duck import literal
from cehrx.data.grammar import PREFIX, UNKNOWN
from cehrx.data.shards import SECONDS_PER_YEAR, SPLITS

SPLIT_RANK = (
    "(CASE split " + " ".join(f"WHEN {literal(s)} THEN {i}" for i, s in enumerate(SPLITS)) + f" ELSE {len(SPLITS)} END)"
)


def select_codes(con: duckdb.DuckDBPyConnection, min_subjects: int) -> dict:
    """`kept_codes(cid, code, subjects)`: codes of body events seen in >= min_subjects train subjects.

    One pass over `body` counts every (code, subject) pair, then codes by their integer `cid`
    (train subjects and all rows: cheaper than a count(DISTINCT) after joining every event to `demo`);
    rare codes are not deleted from `body`, they are left out when the events are ordered.
    """
    con.execute("""
        CREATE OR REPLACE TEMP TABLE code_counts AS
        SELECT c.cid, CAST(sum(c.n) AS BIGINT) AS n, count(*) FILTER (WHERE d.split = 'train') AS subjects
        FROM (SELECT cid, subject_id, count(*) AS n FROM body GROUP BY cid, subject_id) c JOIN demo d USING (subject_id)
        GROUP BY c.cid
    """)
    kept = f"subjects >= {int(min_subjects)} AND subjects > 0"  # a code absent from train is never kept
    con.execute(f"""
        CREATE OR REPLACE TABLE kept_codes AS
        SELECT n.cid, c.code, n.subjects FROM code_counts n JOIN code_ids c USING (cid) WHERE {kept}
    """)
    dropped = con.execute(f"SELECT coalesce(sum(n), 0), count(*) FROM code_counts WHERE NOT ({kept})").fetchall()[0]
    con.execute("DROP TABLE code_counts")
    return {"rare_code_events_dropped": int(dropped[0]), "rare_codes_dropped": int(dropped[1])}


def learn_value_edges(con: duckdb.DuckDBPyConnection, num_bins: int, min_values: int) -> int:
    """`edges(code, cid, cuts, lo, hi)`: per kept code, value quantiles on the train split.

    `cuts` holds the num_bins-1 inner cut points; lo/hi the observed range, so decoding can
    sample a value inside a bin.
    """
    qs = ", ".join(repr(i / num_bins) for i in range(1, num_bins))
    con.execute(f"""
        CREATE OR REPLACE TABLE edges AS
        SELECT any_value(k.code) AS code, b.cid, quantile_cont(b.numeric_value, [{qs}]) AS cuts,
               min(b.numeric_value) AS lo, max(b.numeric_value) AS hi
        FROM body b JOIN demo d USING (subject_id) JOIN kept_codes k USING (cid)
        WHERE d.split = 'train' AND b.numeric_value IS NOT NULL
        GROUP BY b.cid HAVING count(*) >= {int(min_values)}
    """)
    return con.execute("SELECT count(*) FROM edges").fetchall()[0][0]


def kept_only(rare_codes: bool) -> str:
    """SQL joined to `body b`: keep the events of kept codes; nothing when no code was dropped.

    Every code of `body` is in `kept_codes` unless `select_codes` dropped one, and then the
    SEMI JOIN filters nothing but still costs a probe per event (about 0.5 s at GiBleed x40).
    """
    return "SEMI JOIN kept_codes k USING (cid)" if rare_codes else ""


def order_visits(
    con: duckdb.DuckDBPyConnection, inpatient_types: list[str], day_visit_type: str, rare_codes: bool = True
) -> None:
    """`vis`: every visit (source and day visits) in order, with effective start/end and the day gap before each.

    A visit ends no earlier than its last kept event: only source visits need that check, a day
    visit already spans all of its events. One window (one sort) numbers a subject's visits and
    carries the latest end before each. `demo_t.vbase` is the position of a subject's first visit in
    token order (split, subject_id), so a visit's position is vbase + r - 1. `rare_codes`: whether
    `select_codes` dropped any code (else `kept_codes` filters nothing and is not joined).
    """
    inpatient = ", ".join(literal(str(t)) for t in inpatient_types) or "NULL"
    con.execute(f"""
        CREATE OR REPLACE TABLE vis AS
        WITH m AS (
            SELECT b.subject_id, b.vkey, max(b.time) AS tmax FROM body b {kept_only(rare_codes)}
            WHERE b.how < 2 GROUP BY ALL
        ), v AS (
            SELECT a.subject_id, a.vkey, a.vtype, a.vstart, greatest(a.vend, coalesce(m.tmax, a.vend)) AS vend2, a.discharge
            FROM allv_src a LEFT JOIN m USING (subject_id, vkey)
            UNION ALL
            SELECT subject_id, vkey, {literal(day_visit_type)}, vstart, vend, NULL FROM dayv
        ), p AS (
            SELECT v.*, d.split, row_number() OVER w AS r,
                   max(vend2) OVER (w ROWS BETWEEN UNBOUNDED PRECEDING AND 1 PRECEDING) AS prev_end
            FROM v JOIN demo d USING (subject_id)
            WINDOW w AS (PARTITION BY subject_id ORDER BY vstart, vend2, vtype, vkey)
        )
        SELECT subject_id, {SPLIT_RANK} AS sr, split, vkey, r, vtype, discharge,
               vtype IN ({inpatient}) AS inpatient,
               greatest(vstart, coalesce(prev_end, vstart)) AS est,
               greatest(vend2, coalesce(prev_end, vend2)) AS eend,
               CASE WHEN prev_end IS NOT NULL THEN greatest(date_diff('day', CAST(prev_end AS DATE), CAST(vstart AS DATE)), 0) END AS gap_days
        FROM p
    """)
    con.execute("DROP TABLE allv_src")
    con.execute("DROP TABLE dayv")
    # birth is usable when known and not after the first visit
    con.execute(f"""
        CREATE OR REPLACE TABLE demo_t AS
        SELECT d.*, f.first_t, f.last_t, f.n_visits, CASE WHEN d.birth <= f.first_t THEN d.birth END AS birth_ok,
               CAST(sum(f.n_visits) OVER (ORDER BY {SPLIT_RANK}, d.subject_id ROWS UNBOUNDED PRECEDING) - f.n_visits AS BIGINT) AS vbase
        FROM demo d JOIN (SELECT subject_id, min(est) AS first_t, max(eend) AS last_t, max(r) AS n_visits FROM vis GROUP BY subject_id) f
             USING (subject_id)
    """)


def seconds(us: np.ndarray) -> np.ndarray:
    """`CAST(epoch(t) AS BIGINT)` of DuckDB from microseconds: the same double, rounded half to even."""
    return np.rint(us / 1e6).astype(np.int64)


@dataclass
class Ordered:
    """Subjects, visits and events in token order (split, subject_id, visit rank, event order).

    Subjects are those with at least one visit; visit j belongs to the subject whose
    [vfirst, vfirst + nvis) range holds it, and owns events [efirst[j], efirst[j] + nev[j]).
    String columns (prompt tokens, visit types, discharges, the death gap) stay Arrow arrays until
    `Resolver` maps their few distinct values to ids.
    """

    subject_id: np.ndarray
    split: np.ndarray  # int8 index into SPLITS
    nvis: np.ndarray
    birth_s: pa.Array  # int64 seconds, null when unknown
    first_us: np.ndarray
    prompt: list[pa.Array]  # YEAR, AGE, GENDER, RACE token strings
    death_us: np.ndarray  # int64; meaningful where has_death
    has_death: np.ndarray
    death_days: np.ndarray  # int64 days from the last visit's end to death (-1 without death)
    gap_days: np.ndarray  # int64, -1 for a subject's first visit
    est_us: np.ndarray
    eend_us: np.ndarray
    vtype: pa.Array
    discharge: pa.Array
    inpatient: np.ndarray
    nev: np.ndarray
    t_us: np.ndarray  # event time (not before its visit's start)
    cid: np.ndarray  # int32 code number (code order)
    value: np.ndarray  # float64, NaN when none
    vfirst: np.ndarray = field(init=False)
    efirst: np.ndarray = field(init=False)
    seconds: dict[str, np.ndarray] = field(init=False)  # output times (s) of first/death/est/eend/t

    def __post_init__(self) -> None:
        self.vfirst = np.concatenate([[0], np.cumsum(self.nvis)]).astype(np.int64)
        self.efirst = np.concatenate([[0], np.cumsum(self.nev)]).astype(np.int64)
        names = ("first", "death", "est", "eend", "t")
        with ThreadPoolExecutor(max_workers=2) as pool:  # numpy releases the GIL: use both cores
            self.seconds = dict(zip(names, pool.map(seconds, [getattr(self, f"{k}_us") for k in names])))


def fetch_ordered(con: duckdb.DuckDBPyConnection, rare_codes: bool = True) -> Ordered:
    """Read subjects, visits and events from DuckDB in token order (one sort each), then drop `body`.

    Visits come unsorted and are put in place by their position with numpy; their two string
    columns are dictionary-encoded first, so only int32 indices are permuted. `rare_codes` as in
    `order_visits`.
    """
    year, age, gender, race = (literal(PREFIX[k]) for k in g.PROMPT_KINDS)
    unknown = literal(UNKNOWN)
    subj = con.sql(f"""
        SELECT subject_id, {SPLIT_RANK} AS sr, n_visits, CAST(epoch(birth_ok) AS BIGINT) AS birth_s, epoch_us(first_t) AS first_us,
               {year} || CAST(year(first_t) AS VARCHAR) AS p0,
               CASE WHEN birth_ok IS NULL THEN {age} || {unknown}
                    ELSE {age} || CAST(CAST(floor((epoch(first_t) - epoch(birth_ok)) / {SECONDS_PER_YEAR}) AS BIGINT) AS VARCHAR) END AS p1,
               {gender} || coalesce(gender, {unknown}) AS p2, {race} || coalesce(race, {unknown}) AS p3,
               death IS NOT NULL AS has_death, coalesce(epoch_us(greatest(death, last_t)), 0) AS death_us,
               coalesce(greatest(date_diff('day', CAST(last_t AS DATE), CAST(death AS DATE)), 0), -1) AS death_days
        FROM demo_t ORDER BY vbase
    """).to_arrow_table()
    # visits come unsorted and are put in place by their position (subject's first visit + rank)
    vis = con.sql("""
        SELECT d.vbase + v.r - 1 AS vpos, coalesce(v.gap_days, -1) AS gap_days, epoch_us(v.est) AS est_us, epoch_us(v.eend) AS eend_us,
               v.vtype, v.discharge, v.inpatient
        FROM vis v JOIN demo_t d USING (subject_id)
    """).to_arrow_table()
    where = np.empty(vis.num_rows, dtype=np.int64)
    where[vis.column("vpos").to_numpy()] = np.arange(vis.num_rows)
    placed = lambda c: vis.column(c).to_numpy()[where]
    placed_str = lambda c: pc.dictionary_encode(vis.column(c).combine_chunks()).take(where)
    ev = con.sql(f"""
        SELECT d.vbase + v.r - 1 AS vpos, epoch_us(greatest(b.time, v.est)) AS t_us, b.cid, coalesce(b.numeric_value, 'NaN'::DOUBLE) AS value
        FROM body b {kept_only(rare_codes)} JOIN vis v USING (subject_id, vkey) JOIN demo_t d USING (subject_id)
        ORDER BY vpos, b.time, b.trank, b.cid, b.numeric_value
    """).to_arrow_table()
    con.execute("DROP TABLE body")
    col = lambda t, c: t.column(c).to_numpy()
    has_death = col(subj, "has_death").astype(bool)
    return Ordered(
        subject_id=col(subj, "subject_id"),
        split=col(subj, "sr").astype(np.int8),
        nvis=col(subj, "n_visits").astype(np.int64),
        birth_s=subj.column("birth_s").combine_chunks(),
        first_us=col(subj, "first_us"),
        prompt=[subj.column(f"p{i}").combine_chunks() for i in range(g.PROMPT_LEN)],
        death_us=col(subj, "death_us"),
        has_death=has_death,
        death_days=col(subj, "death_days").astype(np.int64),
        gap_days=placed("gap_days"),
        est_us=placed("est_us"),
        eend_us=placed("eend_us"),
        vtype=placed_str("vtype"),
        discharge=placed_str("discharge"),
        inpatient=placed("inpatient").astype(bool),
        nev=np.bincount(col(ev, "vpos"), minlength=vis.num_rows).astype(np.int64),
        t_us=col(ev, "t_us"),
        cid=col(ev, "cid").astype(np.int32),
        value=col(ev, "value"),
    )


# `Ordered`'s columns by level, as `save_ordered` writes them (the prompt tokens as p0..p3)
SAVED = {
    "subjects": ("subject_id", "split", "nvis", "birth_s", "first_us", "death_us", "has_death", "death_days"),
    "visits": ("gap_days", "est_us", "eend_us", "vtype", "discharge", "inpatient", "nev"),
    "events": ("t_us", "cid", "value"),
}


def save_ordered(o: Ordered, folder: Path) -> None:
    """`o` as Arrow IPC files (subjects, visits, events): the sharded prepare's visits job fetches it, its
    tokenize job reads it back once the vocabulary is known, instead of ordering the visits and events
    again (GiBleed x40, a shard of 8: 0.34 s of a 1.05 s tokenize job). lz4: a third of the size (45 ->
    15 MB, ~40 B an event uncompressed) for ~0.02 s more to write and read it."""
    folder.mkdir(parents=True, exist_ok=True)
    for level, names in SAVED.items():
        cols = {c: getattr(o, c) for c in names}
        if level == "subjects":
            cols.update({f"p{i}": p for i, p in enumerate(o.prompt)})
        table = pa.table({c: v if isinstance(v, pa.Array) else pa.array(v) for c, v in cols.items()})
        with ipc.new_file(folder / f"{level}.arrow", table.schema, options=ipc.IpcWriteOptions(compression="lz4")) as w:
            w.write_table(table)


def load_ordered(folder: Path) -> Ordered:
    """What `save_ordered` wrote, as the `Ordered` it was."""
    cols: dict = {}
    for level in SAVED:
        table = ipc.open_file(pa.memory_map(str(folder / f"{level}.arrow"))).read_all()
        cols.update({c: one_chunk(table.column(c)) for c in table.column_names})
    arrow = {"birth_s", "vtype", "discharge"} | {f"p{i}" for i in range(g.PROMPT_LEN)}
    num = {c: a.to_numpy(zero_copy_only=False) for c, a in cols.items() if c not in arrow}
    return Ordered(
        **num,
        birth_s=cols["birth_s"],
        vtype=cols["vtype"],
        discharge=cols["discharge"],
        prompt=[cols[f"p{i}"] for i in range(g.PROMPT_LEN)],
    )


def one_chunk(a: pa.ChunkedArray) -> pa.Array:
    """The column as one array, without a copy when it is one already (`combine_chunks` copies)."""
    return a.chunk(0) if a.num_chunks == 1 else a.combine_chunks()
