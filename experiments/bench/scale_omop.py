"""Make a k-times larger OMOP CDM by copying every patient k times under new ids (DuckDB, set-based).

    python experiments/bench/scale_omop.py SRC_DIR DST_DIR --k 10

SRC_DIR is a folder of `<table>.parquet` files (e.g. shared/data/omop_eunomia_gibleed/parquet).
DST_DIR gets one zstd parquet file per table. For copy c in 0..k-1 every row of a patient-level
table is written once with its ids shifted by c * OFFSET:

- shifted: integer columns named `*_id` (person_id, visit_occurrence_id, condition_occurrence_id,
  visit_detail_id, preceding_visit_occurrence_id, note_id, cohort.subject_id, ...), so primary keys
  stay unique and foreign keys (including dangling ones) keep pointing where they pointed;
- not shifted: `*_concept_id` (vocabulary), ids of shared reference rows (provider_id, care_site_id,
  location_id, cohort/attribute definitions, cost_domain_id), non-integer columns, and the sentinel
  values 0 and NULL ("no such row");
- copied once, unchanged: vocabulary and metadata tables (concept*, vocabulary, domain, relationship,
  drug_strength, source_to_concept_map, cdm_source, metadata, care_site, provider, location, ...).

Copy 0 is the original data unchanged. OFFSET defaults to the smallest power of ten above every
shifted id in the source. Rows are written ordered by (copy, source row), so the output is
deterministic. One COPY statement per table; no per-row Python.
"""

from __future__ import annotations

import argparse
import json
import shutil
import time
from pathlib import Path

import duckdb

# Tables that describe the vocabulary or the site rather than patients: copied once.
REFERENCE_TABLES = {
    "concept",
    "concept_ancestor",
    "concept_class",
    "concept_relationship",
    "concept_synonym",
    "domain",
    "drug_strength",
    "relationship",
    "source_to_concept_map",
    "vocabulary",
    "cdm_source",
    "metadata",
    "care_site",
    "provider",
    "location",
    "location_history",
    "cohort_definition",
    "attribute_definition",
}
# `*_id` columns of patient tables that point at shared (copied-once) rows or code lists.
NOT_SHIFTED = {
    "provider_id",
    "care_site_id",
    "location_id",
    "cohort_definition_id",
    "attribute_definition_id",
    "cost_domain_id",
    "domain_id",
    "vocabulary_id",
    "concept_class_id",
    "relationship_id",
}
INTEGER_TYPES = {"TINYINT", "SMALLINT", "INTEGER", "BIGINT", "HUGEINT", "UTINYINT", "USMALLINT", "UINTEGER", "UBIGINT"}


def _q(name: str) -> str:
    return '"' + name.replace('"', '""') + '"'


def _lit(s: str) -> str:
    return "'" + s.replace("'", "''") + "'"


def shifted_columns(columns: list[tuple[str, str]]) -> list[str]:
    """The columns of a patient-level table whose values are shifted per copy.

    >>> shifted_columns([("person_id", "BIGINT"), ("drug_concept_id", "BIGINT"), ("provider_id", "BIGINT"),
    ...                  ("visit_occurrence_id", "BIGINT"), ("unique_device_id", "VARCHAR"), ("fact_id_1", "BIGINT")])
    ['person_id', 'visit_occurrence_id', 'fact_id_1']
    """
    out = []
    for name, typ in columns:
        n = name.lower()
        is_id = n.endswith("_id") or n in ("fact_id_1", "fact_id_2")
        if is_id and not n.endswith("concept_id") and n not in NOT_SHIFTED and typ.upper() in INTEGER_TYPES:
            out.append(name)
    return out


def scale_omop(
    src: str | Path,
    dst: str | Path,
    k: int,
    offset: int | None = None,
    memory_limit: str = "4GB",
    threads: int | None = None,
) -> dict:
    """Write the k-times scaled copy of the OMOP parquet folder `src` into `dst`; return a summary."""
    src, dst = Path(src), Path(dst)
    if k < 1:
        raise ValueError("k must be >= 1")
    files = sorted(src.glob("*.parquet"))
    if not any(f.stem.lower() == "person" for f in files):
        raise FileNotFoundError(f"no person.parquet in {src}")
    start = time.perf_counter()
    con = duckdb.connect(":memory:")
    con.execute(f"SET memory_limit = '{memory_limit}'")
    if threads:
        con.execute(f"SET threads = {int(threads)}")
    con.execute("SET preserve_insertion_order = true")
    plan: dict[str, tuple[Path, list[tuple[str, str]], list[str]]] = {}
    for f in files:
        table = f.stem.lower()
        cols = [(r[0], r[1]) for r in con.sql(f"DESCRIBE SELECT * FROM read_parquet({_lit(str(f))})").fetchall()]
        shift = [] if table in REFERENCE_TABLES else shifted_columns(cols)
        plan[table] = (f, cols, shift)
    if offset is None:
        max_id = 0
        for f, _, shift in plan.values():
            if shift:
                aggs = ", ".join(f"max(abs({_q(c)}::HUGEINT))" for c in shift)
                vals = con.sql(f"SELECT {aggs} FROM read_parquet({_lit(str(f))})").fetchall()[0]
                max_id = max([max_id] + [int(v) for v in vals if v is not None])
        offset = 10 ** len(str(max_id))
    if (k - 1) * offset + offset >= 2**63:
        raise ValueError(f"k={k} x offset={offset} overflows BIGINT ids")

    tmp = dst.with_name(dst.name + ".partial")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    rows: dict[str, int] = {}
    for table, (f, cols, shift) in plan.items():
        copies = 1 if table in REFERENCE_TABLES else k
        exprs = []
        for name, typ in cols:
            if name in shift:
                # keep 0/NULL ("no row") as they are; widen to BIGINT so shifted ids cannot overflow
                exprs.append(
                    f"CASE WHEN s.{_q(name)} = 0 THEN 0::BIGINT ELSE s.{_q(name)}::BIGINT + r.c * {offset}::BIGINT END AS {_q(name)}"
                )
            else:
                exprs.append(f"s.{_q(name)}")
        sql = (
            f"SELECT {', '.join(exprs)} FROM range({copies}) r(c) "
            f"CROSS JOIN read_parquet({_lit(str(f))}, file_row_number = true) s "
            f"ORDER BY r.c, s.file_row_number"
        )
        out = tmp / f"{table}.parquet"
        con.execute(f"COPY ({sql}) TO {_lit(str(out))} (FORMAT parquet, COMPRESSION zstd)")
        rows[table] = con.sql(f"SELECT count(*) FROM read_parquet({_lit(str(out))})").fetchall()[0][0]
    con.close()
    summary = {
        "source": str(src),
        "k": k,
        "offset": offset,
        "rows": rows,
        "shifted": {t: s for t, (_, _, s) in plan.items() if s},
        "seconds": round(time.perf_counter() - start, 3),
    }
    (tmp / "scale.json").write_text(json.dumps(summary, indent=2) + "\n")
    shutil.rmtree(dst, ignore_errors=True)
    tmp.rename(dst)
    return summary


def cached(src: str | Path, dst: str | Path, k: int, offset: int | None = None) -> dict | None:
    """The summary of an existing scaled copy made from the same source with the same k, else None."""
    marker = Path(dst) / "scale.json"
    if not marker.exists():
        return None
    s = json.loads(marker.read_text())
    if s.get("source") == str(Path(src)) and s.get("k") == k and (offset is None or s.get("offset") == offset):
        return s
    return None


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("src", help="OMOP folder of <table>.parquet files")
    ap.add_argument("dst", help="output folder (replaced); keep it outside the repository")
    ap.add_argument("--k", type=int, required=True, help="number of copies of every patient")
    ap.add_argument(
        "--offset", type=int, default=None, help="id shift per copy (default: power of ten above the max id)"
    )
    args = ap.parse_args()
    s = scale_omop(args.src, args.dst, args.k, args.offset)
    print(json.dumps({k: s[k] for k in ("k", "offset", "seconds")} | {"person": s["rows"].get("person")}))


if __name__ == "__main__":
    main()
