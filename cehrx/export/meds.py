"""Write a MEDS 0.4 dataset (validated with the `meds` schemas) from the `events` table."""

from __future__ import annotations

import json
from datetime import datetime, timezone
from pathlib import Path

import duckdb
import pyarrow as pa
import pyarrow.parquet as pq
from meds import CodeMetadataSchema, DataSchema, DatasetMetadataSchema, SubjectSplitSchema

import cehrx
from cehrx.data.shards import SPLITS

EXTENSION_COLUMNS = ("table", "visit_id", "visit_end", "unit", "omop_concept_id")


def write_meds(con: duckdb.DuckDBPyConnection, root: Path, dataset_name: str, batch_rows: int = 1_000_000) -> int:
    """`root/data/<split>/0.parquet`, `metadata/{codes,subject_splits}.parquet`, `metadata/dataset.json`.

    Rows are sorted by (subject_id, time) with static rows first, as MEDS expects.
    """
    total = 0
    for split in SPLITS:
        d = root / "data" / split
        d.mkdir(parents=True, exist_ok=True)
        reader = con.sql("""
            SELECT e.subject_id, e.time, e.code, CAST(e.numeric_value AS FLOAT) AS numeric_value, e.text_value,
                   e.src_table AS "table", e.visit_id, e.visit_end, e.unit, e.omop_concept_id
            FROM events e JOIN subject_split s USING (subject_id) WHERE s.split = ?
            ORDER BY e.subject_id, e.time NULLS FIRST, e.code, e.numeric_value, e.text_value
        """, params=[split]).to_arrow_reader(batch_rows)
        writer = None
        for batch in reader:
            table = DataSchema.align(pa.Table.from_batches([batch]))
            if writer is None:
                writer = pq.ParquetWriter(d / "0.parquet", table.schema, compression="zstd")
            writer.write_table(table)
            total += table.num_rows
        if writer is None:  # empty split: still a valid, typed shard
            empty = con.sql("""SELECT subject_id, time, code, CAST(numeric_value AS FLOAT) AS numeric_value, text_value,
                   src_table AS "table", visit_id, visit_end, unit, omop_concept_id FROM events WHERE false""").to_arrow_table()
            pq.write_table(DataSchema.align(empty), d / "0.parquet")
        else:
            writer.close()
        DataSchema.validate(pq.read_schema(d / "0.parquet"))
    meta = root / "metadata"
    meta.mkdir(parents=True, exist_ok=True)
    codes = con.sql("""
        SELECT code, description, [] :: VARCHAR[] AS parent_codes, omop_concept_id, omop_domain FROM code_meta ORDER BY code
    """).to_arrow_table()
    codes = CodeMetadataSchema.align(codes)
    CodeMetadataSchema.validate(codes)
    pq.write_table(codes, meta / "codes.parquet")
    splits = con.sql("SELECT subject_id, split FROM subject_split ORDER BY subject_id").to_arrow_table()
    pq.write_table(SubjectSplitSchema.align(splits), meta / "subject_splits.parquet")
    info = {"dataset_name": dataset_name, "dataset_version": "unknown", "etl_name": "cehrx",
            "etl_version": cehrx.__version__, "meds_version": "0.4.1",
            "created_at": datetime.now(timezone.utc).isoformat(),
            "raw_source_id_columns": ["visit_id", "omop_concept_id"], "code_modifier_columns": ["unit"]}
    DatasetMetadataSchema.validate(info)
    (meta / "dataset.json").write_text(json.dumps(info, indent=2) + "\n")
    return total
