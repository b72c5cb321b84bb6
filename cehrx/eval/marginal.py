"""Independent-marginals baseline generator: the floor a generative model must beat.

Every synthetic patient gets
- a demographic prompt (YEAR, AGE, GENDER, RACE) drawn from their *joint* distribution (the
  prompt of a random real training patient),
- a number of visits from the marginal distribution of visits per patient,
- each clinical code independently with its patient-level prevalence, placed in a random visit
  (followed by a value decile Q<k> as often as the code has one in the real data),
- visit types and gaps between visits drawn from their marginal distributions, and death with
  the real death rate.

So prevalences and one-dimensional distributions match the training data by construction, while
co-occurrence and the link between codes and demographics are lost. The output has the layout of a
generate output (`tokens/train/*.parquet` in SHARD_SCHEMA + `vocab.json` + `meds/`), so
`evaluate` reads it exactly as it reads a model's samples.
"""

from __future__ import annotations

import json
import shutil
from dataclasses import dataclass
from pathlib import Path

import duckdb
import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from cehrx.data.decode import decode_events, rebuild_times
from cehrx.data.grammar import PREFIX, int_value, prompt_token, quantile_name, time_token, value_of
from cehrx.data.shards import (
    NO_BIRTH,
    PROMPT_LEN,
    SECONDS_PER_YEAR,
    TokenArrays,
    load_split,
    segment_cumsum,
    table_from_arrays,
)
from cehrx.data.vocab import DEATH, VE, VS, Vocab
from cehrx.errors import CehrxError
from cehrx.export.meds import write_meds

MARKER = "marginal.json"


@dataclass
class Marginals:
    """What the sampler draws from, all learned from the real training split."""

    prompts: np.ndarray  # int32 [n_real, 4]
    n_visits: np.ndarray  # int64 [n_real]
    code_ids: np.ndarray  # int64 [n_codes]
    prevalence: np.ndarray  # float [n_codes]
    q_rate: np.ndarray  # float [n_codes] fraction of occurrences followed by a Q token
    q_ids: np.ndarray  # int64 quantile token ids
    visit_types: np.ndarray  # int64 token ids of every real visit's type
    gaps: np.ndarray  # int64 token ids of every gap between two real visits
    death_gaps: np.ndarray  # int64 token ids of gaps before [DEATH]
    death_rate: float


def fit(arrays: TokenArrays, vocab: Vocab) -> Marginals:
    """Learn the marginals in one vectorised pass over the real training tokens."""
    tokens = np.asarray(arrays.tokens, dtype=np.int64)
    offsets = np.asarray(arrays.offsets, dtype=np.int64)
    lengths = np.diff(offsets)
    if len(lengths) == 0 or (lengths < PROMPT_LEN).any():
        raise CehrxError("marginal baseline: every real training sequence needs its 4-token demographic prompt")
    n = len(lengths)
    seq = np.repeat(np.arange(n), lengths)
    kinds = np.asarray(vocab.kinds, dtype=object)[tokens]
    nxt = np.append(tokens[1:], -1)
    same_next = np.append(seq[1:] == seq[:-1], False)
    code_ids = vocab.ids_of_kind("code")
    is_code = kinds == "code"
    pairs = np.unique(seq[is_code] * len(vocab) + tokens[is_code])
    has = np.bincount(pairs % len(vocab), minlength=len(vocab))
    occ = np.bincount(tokens[is_code], minlength=len(vocab))
    q_ids = vocab.ids_of_kind("quantile")
    with_q = np.bincount(tokens[is_code & same_next & np.isin(nxt, q_ids)], minlength=len(vocab))
    is_gap = kinds == "gap"
    death_id = vocab[DEATH]
    return Marginals(
        prompts=tokens[offsets[:-1, None] + np.arange(PROMPT_LEN)].astype(np.int32),
        n_visits=np.maximum(np.bincount(seq[tokens == vocab[VS]], minlength=n), 1),
        code_ids=code_ids,
        prevalence=has[code_ids] / n,
        q_rate=np.where(occ[code_ids] > 0, with_q[code_ids] / np.maximum(occ[code_ids], 1), 0.0),
        q_ids=q_ids,
        visit_types=tokens[np.append(False, tokens[:-1] == vocab[VS]) & (kinds == "visit")],
        gaps=tokens[is_gap & same_next & (nxt == vocab[VS])],
        death_gaps=tokens[is_gap & same_next & (nxt == death_id)],
        death_rate=float(np.isin(np.arange(n), seq[tokens == death_id]).mean()),
    )


def sample(m: Marginals, vocab: Vocab, n: int, seed: int = 0) -> TokenArrays:
    """`n` patients from the marginals, as flat token arrays with rebuilt times (vectorised)."""
    rng = np.random.default_rng(seed)
    prompts = m.prompts[rng.integers(0, len(m.prompts), n)]
    nv = m.n_visits[rng.integers(0, len(m.n_visits), n)]
    pat, code_idx = _draw_codes(m.prevalence, n, rng)
    visit_of_code = np.floor(rng.random(len(pat)) * nv[pat]).astype(np.int64)
    vis_pat = np.repeat(np.arange(n), nv)
    vis_j = np.arange(len(vis_pat)) - np.repeat(np.cumsum(nv) - nv, nv)
    dead = np.flatnonzero(rng.random(n) < m.death_rate)
    with_q = rng.random(len(pat)) < m.q_rate[code_idx]
    death_gaps = m.death_gaps if len(m.death_gaps) else m.gaps
    parts = [  # (patient, visit, slot, sub, token): sorted lexicographically into sequences
        (np.repeat(np.arange(n), PROMPT_LEN), -1, 0, np.tile(np.arange(PROMPT_LEN), n), prompts.ravel()),
        (vis_pat[vis_j > 0], vis_j[vis_j > 0], 0, 0, _pick(m.gaps, (vis_j > 0).sum(), rng, vocab, time_token("D", 0))),
        (vis_pat, vis_j, 1, 0, vocab[VS]),
        (vis_pat, vis_j, 2, 0, _pick(m.visit_types, len(vis_pat), rng, vocab, prompt_token("visit", "OP"))),
        (pat, visit_of_code, 3, 2 * m.code_ids[code_idx], m.code_ids[code_idx]),
        (
            pat[with_q],
            visit_of_code[with_q],
            3,
            2 * m.code_ids[code_idx[with_q]] + 1,
            _pick(m.q_ids, int(with_q.sum()), rng, vocab, quantile_name(1)),
        ),
        (vis_pat, vis_j, 4, 0, vocab[VE]),
        (dead, nv[dead], 0, 0, _pick(death_gaps, len(dead), rng, vocab, time_token("D", 0))),
        (dead, nv[dead], 1, 0, vocab[DEATH]),
    ]
    cols = [
        np.concatenate([np.broadcast_to(np.asarray(p[k]), np.shape(p[0])) for p in parts]).astype(np.int64)
        for k in range(5)
    ]
    order = np.lexsort((cols[3], cols[2], cols[1], cols[0]))
    tokens = cols[4][order].astype(np.int32)
    offsets = np.concatenate([[0], np.cumsum(np.bincount(cols[0], minlength=n))]).astype(np.int64)
    start, birth = _prompt_times(vocab, prompts, rng)
    times = rebuild_times(vocab, tokens, offsets, start)
    return TokenArrays(np.arange(1, n + 1, dtype=np.int64), offsets, tokens, times, birth)


def _draw_codes(prevalence: np.ndarray, n: int, rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray]:
    """(patient, code index) pairs, each present independently with its prevalence (chunked)."""
    chunk = max(1, 4_000_000 // max(len(prevalence), 1))
    pats, codes = [], []
    for s in range(0, n, chunk):
        rows, cols = np.nonzero(rng.random((min(chunk, n - s), len(prevalence))) < prevalence)
        pats.append(rows + s)
        codes.append(cols)
    return np.concatenate(pats).astype(np.int64), np.concatenate(codes).astype(np.int64)


def _pick(pool: np.ndarray, k: int, rng: np.random.Generator, vocab: Vocab, fallback: str) -> np.ndarray:
    pool = pool if len(pool) else np.array([vocab.id(fallback)])
    return pool[rng.integers(0, len(pool), k)]


def _prompt_times(vocab: Vocab, prompts: np.ndarray, rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray]:
    """First-visit start (a random day of the prompt's year) and birth consistent with the AGE token."""

    def number(ids: np.ndarray, kind: str) -> np.ndarray:
        names = np.asarray(vocab.tokens, dtype=object)[ids]
        return np.array([np.nan if (v := int_value(t, kind)) is None else float(v) for t in names])

    year = number(prompts[:, 0], "year")
    age = number(prompts[:, 1], "age")
    year = np.where(np.isnan(year), 2000, year).astype(np.int64)
    start = (year - 1970).astype("datetime64[Y]").astype("datetime64[s]").astype(np.int64) + rng.integers(
        0, 365, len(year)
    ) * 86400
    birth = start - np.round((np.nan_to_num(age) + rng.random(len(age))) * SECONDS_PER_YEAR).astype(np.int64)
    return start, np.where(np.isnan(age), NO_BIRTH, birth)


def write_tokens(out: Path, arrays: TokenArrays) -> None:
    """`out/tokens/train/0.parquet` in SHARD_SCHEMA."""
    d = out / "tokens" / "train"
    d.mkdir(parents=True, exist_ok=True)
    pq.write_table(table_from_arrays(arrays), d / "0.parquet")


def source_code_map(vocab: Vocab, real_codes: list[str]) -> dict[str, str]:
    """Prompt and visit tokens -> the real dataset's code spelling (`GENDER//F` -> `Gender/F`).

    prepare turns `Gender/F` (OMOP) or `GENDER//F` (MIMIC MEDS) into the token `GENDER//F`, and
    `Visit/IP` into `VISIT//IP`; writing synthetic MEDS with the source's spelling lets the same
    ACES task definitions (e.g. `Visit/IP`) and count features apply to real and synthetic data.
    """
    index: dict[tuple[str, str], str] = {}
    for c in sorted(real_codes, reverse=True):  # the alphabetically first spelling wins
        index[(c.split("/", 1)[0].upper(), c.rsplit("/", 1)[-1])] = c
    out = {}
    for t, k in zip(vocab.tokens, vocab.kinds):
        if k in ("gender", "race", "visit"):
            key = (PREFIX[k].removesuffix("//"), value_of(t))  # GENDER//F -> (GENDER, F)
            if key in index:
                out[t] = index[key]
    return out


def visit_ends(vocab: Vocab, arrays: TokenArrays) -> pa.Table:
    """`(subject_id, visit_id, visit_end)` from each visit's [VE] time (visit ids as decode_events numbers them)."""
    tokens = np.asarray(arrays.tokens)
    seq = np.repeat(np.arange(len(arrays)), np.diff(arrays.offsets))
    visit = segment_cumsum(tokens == vocab[VS], arrays.offsets)
    ve = np.flatnonzero((tokens == vocab[VE]) & (visit > 0))
    return pa.table(
        {
            "subject_id": pa.array(np.asarray(arrays.subject_id)[seq[ve]]),
            "visit_id": pa.array(visit[ve].astype(np.int64)),
            "visit_end": pa.array(np.asarray(arrays.times)[ve].astype("datetime64[s]").astype("datetime64[us]")),
        }
    )


def write_synthetic_meds(
    out: Path, vocab: Vocab, arrays: TokenArrays, real_meds: Path | None, name: str, seed: int
) -> int:
    """Decode the sequences to MEDS events and write a validated MEDS dataset at `out/meds`.

    Codes use the real dataset's spelling (`source_code_map`), visit rows carry `visit_end`
    (the [VE] time) as cehrx's real MEDS does, and descriptions / OMOP concept ids come from the
    real `codes.parquet` when there is one. Every subject is in the `train` split.
    """
    events = decode_events(
        vocab, arrays.subject_id, arrays.offsets, arrays.tokens, arrays.times, arrays.birth_time, seed=seed
    )
    con = duckdb.connect()
    con.execute("SET TimeZone = 'UTC'")
    _real_codes_view(con, real_meds)
    mapping = source_code_map(vocab, [r[0] for r in con.execute("SELECT code FROM real_codes").fetchall()])
    con.register("decoded", events)
    con.register(
        "code_map",
        pa.table(
            {"token": pa.array(list(mapping), pa.string()), "code": pa.array(list(mapping.values()), pa.string())}
        ),
    )
    con.register(
        "vocab_desc",
        pa.table(
            {
                "token": pa.array(vocab.tokens, pa.string()),
                "description": pa.array(vocab.descriptions, pa.string()),
                "is_visit": pa.array([k == "visit" for k in vocab.kinds]),
            }
        ),
    )
    con.register("ends", visit_ends(vocab, arrays))
    _meds_tables(con)
    n = write_meds(con, out / "meds", name)
    con.close()
    return n


def _real_codes_view(con: duckdb.DuckDBPyConnection, real_meds: Path | None) -> None:
    """View `real_codes(code, description, omop_concept_id, omop_domain)` of the real `codes.parquet`
    (empty without one; MEDS sources have no OMOP columns: NULL then)."""
    real_codes = real_meds / "metadata" / "codes.parquet" if real_meds else None
    if real_codes is not None and real_codes.is_file():
        have = set(pq.read_schema(real_codes).names)
        cols = ", ".join(
            c if c in have else f"NULL::{t} AS {c}"
            for c, t in (
                ("code", "VARCHAR"),
                ("description", "VARCHAR"),
                ("omop_concept_id", "BIGINT"),
                ("omop_domain", "VARCHAR"),
            )
        )
        con.execute(f"CREATE VIEW real_codes AS SELECT {cols} FROM read_parquet('{real_codes.as_posix()}')")
    else:
        con.execute(
            "CREATE VIEW real_codes AS SELECT NULL::VARCHAR code, NULL::VARCHAR description, NULL::BIGINT omop_concept_id, NULL::VARCHAR omop_domain WHERE false"
        )


def _meds_tables(con: duckdb.DuckDBPyConnection) -> None:
    """`events`, `code_meta` and `subject_split`, the tables `write_meds` reads, from the decoded
    rows (`decoded`) and the lookups registered on `con` (`code_map`, `vocab_desc`, `ends`, `real_codes`)."""
    con.execute("""CREATE TABLE ev AS
        SELECT e.subject_id, e.time, coalesce(m.code, e.code) AS code, e.code AS token, e.numeric_value, e.visit_id,
               CASE WHEN v.is_visit THEN x.visit_end END AS visit_end
        FROM decoded e LEFT JOIN code_map m ON m.token = e.code LEFT JOIN vocab_desc v ON v.token = e.code
        LEFT JOIN ends x ON x.subject_id = e.subject_id AND x.visit_id = e.visit_id""")
    con.execute("""CREATE TABLE code_meta AS
        SELECT d.code, coalesce(r.description, v.description) AS description,
               CAST(r.omop_concept_id AS BIGINT) AS omop_concept_id, CAST(r.omop_domain AS VARCHAR) AS omop_domain
        FROM (SELECT code, min(token) AS token FROM ev GROUP BY code) d LEFT JOIN real_codes r USING (code)
        LEFT JOIN vocab_desc v ON v.token = d.token""")
    con.execute("""CREATE TABLE events AS
        SELECT e.subject_id, e.time, e.code, e.numeric_value, NULL::VARCHAR AS text_value, NULL::VARCHAR AS src_table,
               e.visit_id, e.visit_end, NULL::VARCHAR AS unit, m.omop_concept_id
        FROM ev e LEFT JOIN code_meta m USING (code)""")
    con.execute("CREATE TABLE subject_split AS SELECT DISTINCT subject_id, 'train' AS split FROM events")


def generate(prepared_dir: Path, out: Path, n: int | None = None, seed: int = 0, real_meds: Path | None = None) -> dict:
    """Fit on `prepared_dir`'s train split and write `n` patients (default: as many as train) to `out`."""
    vocab = Vocab.load(prepared_dir)
    real = load_split(prepared_dir, "train")
    n = int(n or len(real))
    arrays = sample(fit(real, vocab), vocab, n, seed)
    out.mkdir(parents=True, exist_ok=True)
    write_tokens(out, arrays)
    shutil.copyfile(Path(prepared_dir) / "vocab.json", out / "vocab.json")
    n_events = write_synthetic_meds(out, vocab, arrays, real_meds, "cehrx-marginal-baseline", seed)
    info = {
        "generator": "independent marginals",
        "fitted_on": str(prepared_dir),
        "n_real_train": len(real),
        "n_patients": n,
        "n_tokens": int(len(arrays.tokens)),
        "n_meds_events": n_events,
        "seed": seed,
    }
    (out / MARKER).write_text(json.dumps(info, indent=2) + "\n")
    return info
