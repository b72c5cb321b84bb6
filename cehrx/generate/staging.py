"""Stage synthetic patients in DuckDB and write them as a MEDS dataset.

`Stage.add(arrays)` decodes one shard of patients (`cehrx.data.decode.decode_events`, values
drawn inside their decile) into three tables:

    gen_events   subject_id, time, key, numeric_value, visit     (key: the decoded code)
    gen_visits   subject_id, visit, vtype, vtoken, start_t, end_t, discharge
    gen_persons  subject_id, birth, first_t, last_t, gender, race, death

`Stage.finish(info)` maps every key to the source's code / concept / OMOP table
(`cehrx.generate.concepts`) and builds what `cehrx.export.meds.write_meds` reads: `events`
(with the extension columns, visit ids equal to the OMOP visit_occurrence_ids), `code_meta` and
`subject_split` (every synthetic patient is `train`). The OMOP writer reads the same tables.
"""

from __future__ import annotations

from pathlib import Path

import duckdb
import numpy as np
import pyarrow as pa

from cehrx.data.decode import decode_events
from cehrx.data.duck import literal
from cehrx.data.grammar import PREFIX
from cehrx.data.omop_to_meds import EVENTS_DDL
from cehrx.data.shards import NO_BIRTH, TokenArrays
from cehrx.data.vocab import Vocab
from cehrx.export.meds import write_meds
from cehrx.generate.concepts import SourceInfo, build_concept_map
from cehrx.generate.patients import person_table, visit_table

DISCHARGE_MARK = PREFIX["discharge"]
VISIT_KEYS = f"{PREFIX['visit']}%"  # SQL LIKE patterns of the staged visit and discharge keys
DISCHARGE_KEYS = f"{DISCHARGE_MARK}%"


def seconds_to_ts(col: pa.Array) -> pa.Array:
    """int64 seconds since 1970 (nulls kept) -> timestamp[us]."""
    values = np.asarray(col.fill_null(0), dtype=np.int64).astype("datetime64[s]").astype("datetime64[us]")
    mask = np.asarray(col.is_null()) if col.null_count else None
    return pa.array(values, type=pa.timestamp("us"), mask=mask)


def marked_vocab(vocab: Vocab) -> Vocab:
    """A copy of `vocab` whose discharge tokens decode to `DISCHARGE//<code>` instead of `<code>`.

    `decode_events` writes a discharge as its source code, which may also be a clinical code;
    the mark keeps the two apart (the MEDS row of a discharge is still the bare code).
    """
    tokens = [DISCHARGE_MARK + t if k == "discharge" else t for t, k in zip(vocab.tokens, vocab.kinds)]
    return Vocab(tokens, list(vocab.kinds), vocab.counts, vocab.subjects, vocab.descriptions, vocab.edges, vocab.meta)


class Stage:
    """DuckDB tables of the generated patients, filled shard by shard."""

    def __init__(self, con: duckdb.DuckDBPyConnection, vocab: Vocab) -> None:
        self.con, self.vocab, self.marked = con, vocab, marked_vocab(vocab)
        self.con.execute(
            "CREATE OR REPLACE TABLE gen_events (subject_id BIGINT, time TIMESTAMP, key VARCHAR, numeric_value DOUBLE, visit BIGINT)"
        )
        self.con.execute(
            "CREATE OR REPLACE TABLE gen_visits (subject_id BIGINT, visit BIGINT, vtype VARCHAR, vtoken VARCHAR, start_t TIMESTAMP, end_t TIMESTAMP, discharge VARCHAR)"
        )
        self.con.execute(
            "CREATE OR REPLACE TABLE gen_persons (subject_id BIGINT, birth TIMESTAMP, first_t TIMESTAMP, last_t TIMESTAMP, gender VARCHAR, race VARCHAR, death TIMESTAMP)"
        )

    def add(self, arrays: TokenArrays, seed: int) -> None:
        """Decode one shard of valid patients into the gen_* tables."""
        if len(arrays) == 0:
            return
        ev = decode_events(
            self.marked, arrays.subject_id, arrays.offsets, arrays.tokens, arrays.times, arrays.birth_time, seed=seed
        )
        events = pa.table(
            {
                "subject_id": ev["subject_id"],
                "time": ev["time"],
                "key": ev["code"],
                "numeric_value": ev["numeric_value"].cast(pa.float64()),
                "visit": ev["visit_id"],
            }
        )
        visits = visit_table(self.vocab, arrays)
        visits = pa.table(
            {
                "subject_id": visits["subject_id"],
                "visit": visits["visit"],
                "vtype": visits["vtype"],
                "vtoken": visits["vtoken"],
                "start_t": seconds_to_ts(visits["start"].combine_chunks()),
                "end_t": seconds_to_ts(visits["end"].combine_chunks()),
                "discharge": visits["discharge"],
            }
        )
        persons = person_table(self.vocab, arrays)
        birth = persons["birth"].combine_chunks()
        birth = pa.array(np.asarray(birth), mask=np.asarray(birth) == NO_BIRTH)
        persons = pa.table(
            {
                "subject_id": persons["subject_id"],
                "birth": seconds_to_ts(birth),
                "first_t": seconds_to_ts(persons["first_time"].combine_chunks()),
                "last_t": seconds_to_ts(persons["last_time"].combine_chunks()),
                "gender": persons["gender"],
                "race": persons["race"],
                "death": seconds_to_ts(persons["death"].combine_chunks()),
            }
        )
        for name, table in (("gen_events", events), ("gen_visits", visits), ("gen_persons", persons)):
            self.con.register("_staged", table)
            self.con.execute(f"INSERT INTO {name} SELECT * FROM _staged")
            self.con.unregister("_staged")

    def keys(self) -> list[str]:
        """Every decoded code, visit token, gender and race token that needs a mapping."""
        return [
            r[0]
            for r in self.con.execute("""
            SELECT key FROM gen_events UNION SELECT vtoken FROM gen_visits
            UNION SELECT gender FROM gen_persons UNION SELECT race FROM gen_persons
        """).fetchall()
            if r[0] is not None
        ]

    def finish(self, info: SourceInfo) -> dict:
        """Build concept_map, visits, and the MEDS `events`, `code_meta`, `subject_split` tables."""
        cmap, routing = build_concept_map(self.vocab, self.keys(), info)
        con = self.con
        con.register("_cmap", cmap)
        con.execute("CREATE OR REPLACE TABLE concept_map AS SELECT * FROM _cmap")
        con.unregister("_cmap")
        con.execute("""
            CREATE OR REPLACE TABLE visits AS
            SELECT row_number() OVER (ORDER BY v.subject_id, v.visit) AS visit_occurrence_id, v.*
            FROM gen_visits v ORDER BY v.subject_id, v.visit
        """)
        con.execute(EVENTS_DDL)
        con.execute(f"""
            INSERT INTO events
            SELECT e.subject_id, e.time, m.meds_code, e.numeric_value, NULL,
                   CASE WHEN e.key = 'MEDS_BIRTH' OR e.time IS NULL THEN 'person'
                        WHEN e.key = 'MEDS_DEATH' THEN 'death'
                        WHEN e.key LIKE {literal(VISIT_KEYS)} THEN 'visit_occurrence'
                        WHEN e.key LIKE {literal(DISCHARGE_KEYS)} THEN 'visit_discharge'
                        ELSE m.omop_table END,
                   v.visit_occurrence_id,
                   CASE WHEN e.key LIKE {literal(VISIT_KEYS)} THEN v.end_t END,
                   NULL, nullif(m.concept_id, 0)
            FROM gen_events e JOIN concept_map m ON m.key = e.key
            LEFT JOIN visits v ON v.subject_id = e.subject_id AND v.visit = e.visit AND e.visit > 0
        """)
        con.execute("""
            CREATE OR REPLACE TABLE code_meta AS
            SELECT m.meds_code AS code, any_value(m.description) AS description,
                   any_value(nullif(m.concept_id, 0)) AS omop_concept_id, any_value(m.domain) AS omop_domain
            FROM concept_map m WHERE m.meds_code IN (SELECT DISTINCT code FROM events) GROUP BY m.meds_code ORDER BY 1
        """)
        con.execute(
            "CREATE OR REPLACE TABLE subject_split AS SELECT subject_id, 'train' AS split FROM gen_persons ORDER BY subject_id"
        )
        origins = dict(con.execute("SELECT origin, count(*) FROM concept_map GROUP BY 1 ORDER BY 1").fetchall())
        return {"codes": len(cmap), "concept_origin": origins, "omop_table_routing": routing}

    def write_meds(self, root: Path, dataset_name: str) -> int:
        return write_meds(self.con, root, dataset_name)
