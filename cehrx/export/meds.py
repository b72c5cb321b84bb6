"""Write a MEDS 0.4 dataset (validated with the `meds` schemas) from the `events` table."""

from __future__ import annotations

import json
from datetime import datetime, timezone
from pathlib import Path

import duckdb
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq
from meds import CodeMetadataSchema, DataSchema, DatasetMetadataSchema, SubjectSplitSchema

import cehrx
from cehrx.data.shards import SPLITS

EXTENSION_COLUMNS = ("table", "visit_id", "visit_end", "unit", "omop_concept_id")


def write_meds(con: duckdb.DuckDBPyConnection, root: Path, dataset_name: str, batch_rows: int = 1_000_000) -> int:
    """`root/data/<split>/0.parquet`, `metadata/{codes,subject_splits}.parquet`, `metadata/dataset.json`.

    Rows are sorted by (subject_id, time) with static rows first, as MEDS expects.
    """
    columns = """e.subject_id, e.time, e.code, CAST(e.numeric_value AS FLOAT) AS numeric_value, e.text_value,
                 e.src_table AS "table", e.visit_id, e.visit_end, e.unit, e.omop_concept_id"""
    # One sorted pass over all splits (the sort key is total, so the files are deterministic).
    reader = con.sql(f"""
        SELECT s.split AS _split, {columns}
        FROM events e JOIN subject_split s USING (subject_id)
        ORDER BY s.split, e.subject_id, e.time NULLS FIRST, e.code, e.numeric_value, e.text_value,
                 e.src_table, e.visit_id, e.visit_end, e.unit, e.omop_concept_id
    """).to_arrow_reader(batch_rows)
    writers: dict[str, pq.ParquetWriter] = {}
    total = 0
    for batch in reader:
        table = pa.Table.from_batches([batch])
        for split in pc.unique(table["_split"]).to_pylist():
            part = DataSchema.align(table.filter(pc.equal(table["_split"], split)).drop_columns(["_split"]))
            if split not in writers:
                (root / "data" / split).mkdir(parents=True, exist_ok=True)
                writers[split] = pq.ParquetWriter(root / "data" / split / "0.parquet", part.schema, compression="zstd")
            writers[split].write_table(part)
            total += part.num_rows
    for w in writers.values():
        w.close()
    for split in SPLITS:
        d = root / "data" / split
        if split not in writers:  # empty split: still a valid, typed shard
            d.mkdir(parents=True, exist_ok=True)
            empty = con.sql(f"SELECT {columns} FROM events e WHERE false").to_arrow_table()
            pq.write_table(DataSchema.align(empty), d / "0.parquet")
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
