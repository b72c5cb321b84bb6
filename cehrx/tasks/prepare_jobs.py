"""The jobs of the sharded prepare (`prepare_sharded`): once before the shards `partition_source` (folder
sources); per shard `map_shard`, `visit_shard`, `tokenize_shard`; per split `meds_split` (OMOP);
once `reduce_codes`, `reduce_vocab`, `finish`.

Each takes the resolved config as a plain dict (it is sent to spawned processes) and the work dir,
and does nothing when its `done.json` exists. The per-shard steps are those of the single pass
(`tasks/prepare.py`), run on the shard's subjects; what needs every subject is decided in the reduce
(`data/shard_merge.py`) from what the shards wrote next to their marker:

    source/      the tables as parquet: <table>/cehrx_shard=<k>/ (read, by person), <table>.parquet (other csv)
    map/<k>/     state.duckdb, meds/<split>.parquet (OMOP), code_meta, subject_split, code_counts, values
    meds/<split>/  <split>/0.parquet: the MEDS copy's file of the split, from every shard's part (OMOP)
    codes/       kept_codes.parquet, edges.parquet
    visits/<k>/  subjects.parquet (tokenized subjects), ordered/ (its subjects, visits and events in token
                 order, until its tokens are written), kept and value-cut codes by number; done.json:
                 vocabulary inputs, subject counts
    vocab/       tokens.json (the vocabulary), done.json: first subject of every output file
    tokens/<k>/  <split>/<n>.parquet (its part of output file n), lengths.parquet, counts.npz
"""

from __future__ import annotations

import json
import shutil
from collections import Counter
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
from omegaconf import DictConfig, OmegaConf

from cehrx.data import duck, shard_merge
from cehrx.data.atomic import link_or_copy
from cehrx.data.duck import literal
from cehrx.data.omop_mapping import EVENT_TABLES, OPTIONAL_TABLES, read_columns
from cehrx.data.omop_tables import partition, resolve_path
from cehrx.data.shard_writer import Written, write_parts
from cehrx.data.sharding import Shard, duckdb_limit, is_done, job, parse_bytes, read_done, worker_threads, write_done
from cehrx.data.shards import SPLITS
from cehrx.data.token_order import fetch_ordered, load_ordered, order_visits, save_ordered
from cehrx.data.tokenize import Resolver, token_ids
from cehrx.data.vocab_build import code_arrays, combine_inputs, make_vocab, tokens_from, vocab_inputs
from cehrx.export.meds import write_metadata
from cehrx.export.meds_gather import gather_split, write_part
from cehrx.tasks import prepare as single

# Per shard: the train subjects and events of each code (`token_order.select_codes` before the threshold).
CODE_COUNTS = """
    SELECT k.code, CAST(sum(c.n) AS BIGINT) AS n, count(*) FILTER (WHERE d.split = 'train') AS subjects
    FROM (SELECT cid, subject_id, count(*) AS n FROM body GROUP BY cid, subject_id) c
    JOIN demo d USING (subject_id) JOIN code_ids k USING (cid) GROUP BY k.code
"""
# Per shard: the train values of every code (`token_order.learn_value_edges` keeps the kept codes' ones).
TRAIN_VALUES = """
    SELECT k.code, b.numeric_value AS value FROM body b JOIN demo d USING (subject_id) JOIN code_ids k USING (cid)
    WHERE d.split = 'train' AND b.numeric_value IS NOT NULL
"""


def budget(t) -> int:
    """A worker's memory budget in bytes: `task.memory_budget`, else twice DuckDB's limit."""
    return parse_bytes(t.get("memory_budget")) or 2 * parse_bytes(t.duckdb.memory_limit)


# DuckDB's PARTITION_BY keeps, per thread, buffers for every shard: 75 MB a thread held 5 M csv rows in
# 256 or 1024 shards within the limit, 19 MB failed (out of memory), so `partition_source` gives each thread 100 MB.
PARTITION_THREAD_BYTES = 100 * 10**6


def connection(t, temp: Path, database: Path | None = None, threads: int | None = None):
    """A job's DuckDB: its share of the worker's memory budget and of the node's cores (or `threads`)."""
    threads = t.duckdb.threads or threads or worker_threads(int(t.get("workers") or 1))
    return duck.connect(duckdb_limit(budget(t)), threads, temp_dir=temp, database=database)


def copy(con, sql: str, path: Path) -> None:
    con.execute(f"COPY ({sql}) TO {literal(str(path))} (FORMAT parquet)")


def source_rows(cfg: DictConfig) -> int:
    """Rows of the source's event tables (OMOP) or MEDS data files: the data size the shard count follows."""
    from cehrx.data.meds_source import data_files
    from cehrx.data.omop_tables import open_omop

    if cfg.data.source == "meds":
        return sum(pq.ParquetFile(f).metadata.num_rows for f in data_files(Path(str(cfg.data.path)).expanduser()))
    con = duck.connect(cfg.task.duckdb.memory_limit, cfg.task.duckdb.threads)
    try:
        tables = open_omop(con, str(cfg.data.path))
    finally:
        con.close()
    events = ("person", "visit_occurrence", "death") + tuple(s.name for s in EVENT_TABLES)
    return sum(tables.rows.get(name, 0) for name in events)


def partitioned(cfg) -> bool:
    """Whether the source is a folder of OMOP tables (parquet or csv), which `partition_source` reads once
    for all shards; a DuckDB file (and a MEDS source) is read in place by every shard, with a filter."""
    return cfg.data.source == "omop" and resolve_path(str(cfg.data.path)).is_dir()


def partition_source(cfgd: dict, work: str, shards: int) -> None:
    """The source's tables, each read once: those split by person into per-shard parquet with the columns
    prepare reads (`omop_tables.partition`; why: its module doc), so a shard's `map` reads its own rows
    only. One job, on all the node's cores (at most one per `PARTITION_THREAD_BYTES` of DuckDB's limit),
    within the worker's memory budget; nothing to do for a source that is not a folder."""
    target = Path(work) / "source"
    cfg = OmegaConf.create(cfgd)
    if is_done(target) or not partitioned(cfg):
        return
    with job(target) as tmp:
        per_thread = parse_bytes(duckdb_limit(budget(cfg.task))) // PARTITION_THREAD_BYTES
        con = connection(cfg.task, tmp / ".duckdb_tmp", threads=max(1, min(worker_threads(1), per_thread)))
        tables = partition(con, str(cfg.data.path), tmp, shards, read_columns())
        con.close()
        shutil.rmtree(tmp / ".duckdb_tmp", ignore_errors=True)
        write_done(tmp, {"tables": tables})


def map_shard(cfgd: dict, work: str, k: int, shards: int) -> None:
    """Shard k's subjects, up to their visits: events, splits, MEDS rows, `body` attached to visits;
    spills its train code counts and values for the reduce, and keeps its database for later jobs.

    The work is done in memory (DuckDB spills past its limit) and the tables saved to `state.duckdb` at the
    end (`save`): built in the file, every insert went through its log and every dropped table (`events`)
    stayed in it; GiBleed x40, a shard of 8: 2.8 -> 2.05 s, the file 62 -> 28 MB."""
    target = Path(work) / "map" / str(k)
    if is_done(target):
        return
    cfg = OmegaConf.create(cfgd)
    t = cfg.task
    with job(target) as tmp:
        con = connection(t, tmp / ".duckdb_tmp")
        report: dict = {}
        parts = Path(work) / "source"
        stats, events_in = single.read_events(con, cfg, report, Shard(k, shards), parts if is_done(parts) else None)
        splits = single.split_subjects(con, t.splits, bool(stats.get("source_splits")))
        if cfg.data.source == "omop":
            write_part(con, tmp / "meds")
        copy(con, "SELECT code, description, omop_concept_id, omop_domain FROM code_meta", tmp / "code_meta.parquet")
        copy(con, "SELECT subject_id, split FROM subject_split", tmp / "subject_split.parquet")
        demo_stats, visit_stats = single.build_visits(con, cfg, None)
        copy(con, CODE_COUNTS, tmp / "code_counts.parquet")
        copy(con, TRAIN_VALUES, tmp / "values.parquet")
        save(con, tmp / "state.duckdb")
        con.close()
        shutil.rmtree(tmp / ".duckdb_tmp", ignore_errors=True)
        done = {"events_in": events_in, "stats": stats, "splits": splits, "demo_stats": demo_stats}
        write_done(
            tmp, {**done, "visit_stats": visit_stats, **({"tables": report["tables"]} if "tables" in report else {})}
        )


def save(con, path: Path) -> None:
    """The tables (and views) of the in-memory database `con` as the DuckDB file `path`; not the temp ones."""
    con.execute(f"ATTACH {literal(str(path))} AS saved")
    con.execute("COPY FROM DATABASE memory TO saved")
    con.execute("DETACH saved")


def meds_split(cfgd: dict, work: str, shards: int, split: str) -> None:
    """The MEDS copy's file of `split` from the shards' parts (`meds_gather.gather_split`): it needs only
    the maps, so it runs beside the later stages; `finish` moves it into the output."""
    target = Path(work) / "meds" / split
    if is_done(target):
        return
    with job(target) as tmp:
        parts = [Path(work) / "map" / str(k) / "meds" / f"{split}.parquet" for k in range(shards)]
        write_done(tmp, {"rows": gather_split(parts, split, tmp)})


def reduce_codes(cfgd: dict, work: str, shards: int) -> None:
    """Refuse a run without events, clinical events or a kept code (as the single pass does); then the
    kept codes and value deciles of all shards (`shard_merge.reduce_codes`, `reduce_edges`)."""
    w = Path(work)
    if is_done(w / "codes"):
        return
    cfg = OmegaConf.create(cfgd)
    t = cfg.task
    maps = [read_done(w / "map" / str(k)) for k in range(shards)]
    stats = shard_merge.add_all([m["stats"] for m in maps])
    single.require(sum(m["events_in"] for m in maps), single.NO_EVENTS.format(path=cfg.data.path), stats)
    n_body = sum(m["visit_stats"]["_body_events"] for m in maps)
    single.require(n_body, single.NO_BODY.format(path=cfg.data.path), stats)
    with job(w / "codes") as tmp:
        con = connection(t, tmp / ".duckdb_tmp")
        files = lambda name: [w / "map" / str(k) / name for k in range(shards)]  # noqa: E731
        codes = shard_merge.reduce_codes(con, files("code_counts.parquet"), int(t.min_subjects), tmp)
        if not codes["kept"]:
            splits = shard_merge.merge_splits([m["splits"] for m in maps])
            single.refuse_no_codes(codes["codes_in_train"], codes["most_train_subjects"], int(t.min_subjects), splits)
        q = t.quantiles
        codes["edges"] = shard_merge.reduce_edges(
            con, files("values.parquet"), int(q.num_bins), int(q.min_values), budget(t) // 2, tmp
        )
        con.close()
        shutil.rmtree(tmp / ".duckdb_tmp", ignore_errors=True)
        write_done(tmp, codes)


def shard_state(t, work: Path, k: int, tmp: Path):
    """Shard k's database from `map`, in a transaction its caller rolls back, with the global kept codes
    and value edges on the shard's code numbers; returns (connection, whether it has a rare code)."""
    con = connection(t, tmp / ".duckdb_tmp", work / "map" / str(k) / "state.duckdb")
    con.execute("BEGIN TRANSACTION")
    codes = work / "codes"
    con.execute(f"""
        CREATE OR REPLACE TABLE kept_codes AS
        SELECT c.cid, c.code, k.subjects FROM read_parquet({literal(str(codes / "kept_codes.parquet"))}) k JOIN code_ids c USING (code)
    """)
    con.execute(f"""
        CREATE OR REPLACE TABLE edges AS
        SELECT e.code, c.cid, e.cuts, e.lo, e.hi FROM read_parquet({literal(str(codes / "edges.parquet"))}) e JOIN code_ids c USING (code)
    """)
    rare = con.execute("SELECT (SELECT count(*) FROM code_ids) > (SELECT count(*) FROM kept_codes)").fetchall()[0][0]
    order_visits(con, [str(x) for x in t.inpatient_visit_types], str(t.day_visit_type), rare_codes=bool(rare))
    return con, bool(rare)


def close(con, tmp: Path) -> None:
    con.execute("ROLLBACK")
    con.close()
    shutil.rmtree(tmp / ".duckdb_tmp", ignore_errors=True)


def visit_shard(cfgd: dict, work: str, k: int) -> None:
    """Shard k's visits in token order: its vocabulary inputs, subject counts and tokenized subjects; and,
    for its tokenize job, its subjects, visits and events in token order (`save_ordered`) and code numbers'
    kept codes and value cuts, so that job needs neither the database nor to order the visits again."""
    w = Path(work)
    target = w / "visits" / str(k)
    if is_done(target):
        return
    t = OmegaConf.create(cfgd).task
    with job(target) as tmp:
        con, rare = shard_state(t, w, k, tmp)
        inputs = vocab_inputs(con, int(t.max_gap_days))
        copy(con, "SELECT subject_id, split FROM demo_t", tmp / "subjects.parquet")
        copy(con, "SELECT cid, code FROM kept_codes", tmp / "kept_cids.parquet")
        copy(con, "SELECT cid, cuts FROM edges", tmp / "edges_cids.parquet")
        n_codes = con.execute("SELECT count(*) FROM code_ids").fetchall()[0][0]
        counts = single.subject_counts(con)
        save_ordered(fetch_ordered(con, rare_codes=rare), tmp / "ordered")
        close(con, tmp)
        write_done(tmp, {"inputs": inputs, "subject_counts": counts, "code_numbers": n_codes})


def reduce_vocab(cfgd: dict, work: str, shards: int) -> None:
    """The vocabulary (`vocab_build.tokens_from` on the combined inputs) and each output file's first subject."""
    w = Path(work)
    if is_done(w / "vocab"):
        return
    t = OmegaConf.create(cfgd).task
    inputs = combine_inputs([read_done(w / "visits" / str(k))["inputs"] for k in range(shards)])
    kept = pq.read_table(w / "codes" / "kept_codes.parquet")
    kept = list(zip(kept.column("code").to_pylist(), kept.column("subjects").to_pylist()))
    tokens = tokens_from(inputs, kept, int(t.min_subjects), int(t.quantiles.num_bins), int(t.max_gap_days))
    subjects = [w / "visits" / str(k) / "subjects.parquet" for k in range(shards)]
    firsts = shard_merge.file_firsts(subjects, int(t.subjects_per_shard))
    with job(w / "vocab") as tmp:
        (tmp / "tokens.json").write_text(json.dumps(tokens) + "\n")
        write_done(tmp, {"firsts": firsts, "size": len(tokens)})


def tokenize_shard(cfgd: dict, work: str, k: int) -> None:
    """Shard k's tokens, written as its part of every output file, with its train counts and lengths, from
    what its visits job saved (then removed: the output's files hold it now)."""
    w = Path(work)
    target, visits = w / "tokens" / str(k), w / "visits" / str(k)
    if is_done(target):
        return
    t = OmegaConf.create(cfgd).task
    tokens = json.loads((w / "vocab" / "tokens.json").read_text())
    firsts = read_done(w / "vocab")["firsts"]
    with job(target) as tmp:
        resolver = Resolver({tok: i for i, tok in enumerate(tokens)})
        rows = lambda name: list(zip(*pq.read_table(visits / name).to_pydict().values()))  # noqa: E731
        n_codes = read_done(visits)["code_numbers"]
        num_bins = int(t.quantiles.num_bins)
        code_ids, cuts, has_cuts = code_arrays(
            n_codes, rows("kept_cids.parquet"), rows("edges_cids.parquet"), resolver.index, num_bins
        )
        o = load_ordered(visits / "ordered")
        ids = token_ids(o, resolver, code_ids, cuts, has_cuts, int(t.max_gap_days))
        written = write_parts(o, ids, tmp, firsts, len(tokens))
        np.savez(tmp / "counts.npz", counts=written.counts, subjects=written.subjects)
        lengths = pa.table({"split": o.split, "subject_id": o.subject_id, "n_tokens": written.lengths})
        pq.write_table(lengths, tmp / "lengths.parquet")
        done = {"per_split": written.per_split, "visits_tokenized": len(o.est_us), "events_tokenized": len(o.t_us)}
        write_done(tmp, {**done, "not_in_vocab": resolver.not_in_vocab})
    shutil.rmtree(visits / "ordered", ignore_errors=True)


def finish(cfg: DictConfig, work: Path, shards: int, workers: int, tmp: Path, meds_ready=lambda: None) -> dict:
    """Write the output into `tmp` (the temporary output dir): token files, vocab.json and the MEDS
    copy (its files from the `meds_split` jobs, once `meds_ready()` returns); returns the prepare.json
    report without timings."""
    t = cfg.task
    per = lambda stage: [read_done(work / stage / str(k)) for k in range(shards)]  # noqa: E731
    maps, visits, toks = per("map"), per("visits"), per("tokens")
    codes, tokens = read_done(work / "codes"), json.loads((work / "vocab" / "tokens.json").read_text())
    token_dirs = [work / "tokens" / str(k) for k in range(shards)]
    shard_merge.gather_tokens(token_dirs, read_done(work / "vocab")["firsts"], tmp, max(workers, 2))
    counts = [np.load(d / "counts.npz") for d in token_dirs]
    written = Written(
        per_split=shard_merge.add_all([x["per_split"] for x in toks]),
        lengths=shard_merge.gather_lengths([d / "lengths.parquet" for d in token_dirs]),
        counts=sum(c["counts"] for c in counts),
        subjects=sum(c["subjects"] for c in counts),
    )
    con = connection(t, work / ".duckdb_tmp")
    maps_files = lambda name: shard_merge.files_sql([work / "map" / str(k) / name for k in range(shards)])  # noqa: E731
    con.execute(f"""CREATE TABLE code_meta AS SELECT code, min(description) AS description, min(omop_concept_id) AS omop_concept_id,
                    min(omop_domain) AS omop_domain FROM read_parquet({maps_files("code_meta.parquet")}) GROUP BY code""")
    con.execute(f"CREATE TABLE edges AS FROM read_parquet({literal(str(work / 'codes' / 'edges.parquet'))})")
    inpatient = [str(x) for x in t.inpatient_visit_types]
    vocab = make_vocab(con, tokens, written.counts, written.subjects, single.vocab_meta(t, cfg.data.source, inpatient))
    vocab.save(tmp / "vocab.json")
    if cfg.data.source == "omop":
        meds_ready()
        for split in SPLITS:
            (tmp / "meds" / "data" / split).mkdir(parents=True)
            link_or_copy(work / "meds" / split / split / "0.parquet", tmp / "meds" / "data" / split / "0.parquet")
        con.execute(f"CREATE TABLE subject_split AS FROM read_parquet({maps_files('subject_split.parquet')})")
        write_metadata(con, tmp / "meds", cfg.data.name)
    con.close()
    report = merged_report(cfg, maps, visits, toks, codes, written)
    single.finish_report(report, t, len(vocab), codes["edges"], Counter(vocab.kinds), written.lengths)
    return report


def merged_report(cfg: DictConfig, maps: list, visits: list, toks: list, codes: dict, written: Written) -> dict:
    """The single pass's prepare.json counts, from the shards' (sums) and the reduce's (rare codes)."""
    report = single.source_report(cfg)
    if "tables" in maps[0]:
        report["tables"] = shard_merge.merge_tables([m["tables"] for m in maps], OPTIONAL_TABLES)
    report["splits"] = shard_merge.merge_splits([m["splits"] for m in maps])
    stats = shard_merge.add_all([m["stats"] for m in maps])
    for key in ("files", "source_splits"):  # the same in every shard, not counts
        if key in maps[0]["stats"]:
            stats[key] = maps[0]["stats"][key]
    not_in_vocab = shard_merge.add_all([x["not_in_vocab"] for x in toks])
    report.update(
        single.summarize(
            sum(m["events_in"] for m in maps),
            stats,
            shard_merge.add_all([v["subject_counts"] for v in visits]),
            shard_merge.add_all([m["demo_stats"] for m in maps]),
            shard_merge.merge_visits([m["visit_stats"] for m in maps]),
            {k: codes[k] for k in ("rare_code_events_dropped", "rare_codes_dropped")},
            {k: sum(x[k] for x in toks) for k in ("visits_tokenized", "events_tokenized")},
            {"structural_tokens_not_in_vocab": dict(sorted(not_in_vocab.items()))},
            written,
        )
    )
    return report
