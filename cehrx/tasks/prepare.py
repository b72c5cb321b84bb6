"""`cehrx task=prepare`: OMOP CDM or MEDS -> MEDS dataset + CEHR-GPT token shards + vocab.json.

Output (`output_dir`, written to a temporary sibling and renamed when complete):
    meds/            the MEDS 0.4 dataset the tokens were made from (OMOP sources only)
    tokens/<split>/  token shards (format: cehrx.data.shards)
    vocab.json       the vocabulary (cehrx.data.vocab)
    prepare.json     counts in / kept / dropped by reason, length percentiles, timings
    config.yaml      the resolved config of this run
"""

from __future__ import annotations

import datetime as dt
import logging
import shutil
import time
from pathlib import Path

from omegaconf import DictConfig, OmegaConf
from rich.console import Console

from cehrx.data import duck
from cehrx.data.meds_source import meds_to_events
from cehrx.data.omop_tables import open_omop
from cehrx.data.omop_to_meds import OPTIONAL_TABLES, omop_to_events
from cehrx.data.shard_writer import Written, length_percentiles, write_shards
from cehrx.data.splits import assign_splits, load_split_file
from cehrx.data.tokenize import (
    Resolver,
    fetch_ordered,
    learn_value_edges,
    order_visits,
    select_codes,
    token_ids,
)
from cehrx.data.visits import (
    attach_events,
    build_body,
    build_demographics,
    build_source_visits,
)
from cehrx.data.vocab_build import candidate_tokens, code_tables, make_vocab
from cehrx.errors import DataError
from cehrx.export.meds import write_meds
from cehrx.progress import Stages
from cehrx.tasks.scaffold import task_output, write_marker

log = logging.getLogger("cehrx.prepare")


def run(cfg: DictConfig) -> dict:
    out = Path(cfg.output_dir)
    with task_output(cfg, "prepare") as tmp:
        report = prepare(cfg, tmp)
        write_marker(tmp, "prepare", report)
    log.info("prepared %s subjects into %s", report["subjects"]["tokenized"], out)
    Console(stderr=True).print(
        f"prepared [bold]{report['subjects']['tokenized']}[/bold] subjects, "
        f"{report['events']['tokenized']} events, vocab {report['vocab']['size']} -> {out}"
    )
    return report


def prepare(cfg: DictConfig, out: Path) -> dict:
    """The whole pipeline on one DuckDB connection; returns the prepare.json report."""
    t = cfg.task
    stages = Stages(total=8 if cfg.data.source == "omop" else 7)
    start = time.perf_counter()
    con = duck.connect(t.duckdb.memory_limit, t.duckdb.threads, temp_dir=out / ".duckdb_tmp")
    source, report = cfg.data.source, {"source": {"kind": cfg.data.source, "path": str(cfg.data.path)}}
    with stages("read source -> MEDS events"):
        if source == "omop":
            tables = open_omop(con, str(cfg.data.path))
            stats = omop_to_events(con, tables, current_year=dt.date.today().year)
            report["tables"] = {
                "found": sorted(tables.columns), "rows": tables.rows,
                "missing_optional": sorted(set(OPTIONAL_TABLES) - set(tables.columns)),
                "empty": sorted(k for k, v in tables.rows.items() if v == 0 and k in OPTIONAL_TABLES),
            }
        elif source == "meds":
            stats = meds_to_events(con, str(cfg.data.path))
        else:
            raise DataError(f"data.source must be 'omop' or 'meds', got {source!r}")
    events_in = con.execute("SELECT count(*) FROM events").fetchall()[0][0]
    with stages("splits"):
        split_file = t.splits.get("file")
        if split_file:  # the user's file wins over the dataset's own splits
            load_split_file(con, str(split_file), strict=True)
        use_source = bool(split_file or stats.get("source_splits"))
        report["splits"] = assign_splits(con, {k: float(t.splits[k]) for k in ("train", "tuning", "held_out")}, str(t.splits.salt), use_source=use_source)
        if split_file:
            report["splits"].update(method="file", file=str(split_file))
    if source == "omop":
        with stages("write MEDS dataset"):
            write_meds(con, out / "meds", cfg.data.name)
    with stages("visits"):
        demo_stats = build_demographics(con, cfg.data)
        build_body(con, cfg.data)
        build_source_visits(con, source, OmegaConf.to_container(cfg.data.visits) if cfg.data.get("visits") else [])
        con.execute("DROP TABLE events")  # the rest works on body/demo/src_visits: free memory before the big sorts
        visit_stats = attach_events(con)
    with stages("vocabulary codes and value deciles"):
        code_stats = select_codes(con, int(t.min_subjects))
        n_edges = learn_value_edges(con, int(t.quantiles.num_bins), int(t.quantiles.min_values))
    inpatient = [str(x) for x in t.inpatient_visit_types]
    with stages("tokenize"):
        rare = code_stats["rare_codes_dropped"] > 0  # else kept_codes filters nothing: not joined
        order_visits(con, inpatient, str(t.day_visit_type), rare_codes=rare)
        tokens = candidate_tokens(con, int(t.min_subjects), int(t.quantiles.num_bins), int(t.max_gap_days))
        resolver = Resolver({tok: i for i, tok in enumerate(tokens)})
        code_ids, cuts, has_cuts = code_tables(con, resolver.index, int(t.quantiles.num_bins))
        ordered = fetch_ordered(con, rare_codes=rare)
        ids = token_ids(ordered, resolver, code_ids, cuts, has_cuts, int(t.max_gap_days))
    with stages("token shards"):
        written = write_shards(ordered, ids, out, int(t.subjects_per_shard), len(tokens))
    with stages("vocab.json"):
        meta = {"source_kind": source, "min_subjects": int(t.min_subjects), "num_bins": int(t.quantiles.num_bins),
                "max_gap_days": int(t.max_gap_days), "prompt": ["YEAR", "AGE", "GENDER", "RACE"],
                "inpatient_visit_types": inpatient}
        vocab = make_vocab(con, tokens, written.counts, written.subjects, meta)
        vocab.save(out / "vocab.json")
    tok_stats = {"visits_tokenized": len(ordered.est_us), "events_tokenized": len(ordered.t_us)}
    vocab_stats = {"structural_tokens_not_in_vocab": dict(sorted(resolver.not_in_vocab.items()))}
    report.update(summarize(con, events_in, stats, demo_stats, visit_stats, code_stats, tok_stats, vocab_stats, written))
    report["vocab"] = {"size": len(vocab), "codes_with_value_deciles": n_edges,
                       "by_kind": {k: vocab.kinds.count(k) for k in dict.fromkeys(vocab.kinds)}}
    report["tokens"]["length"] = length_percentiles(written.lengths)
    report["timings_s"] = {**stages.timings, "total": round(time.perf_counter() - start, 3)}
    report["events"]["per_second"] = round(report["events"]["in"] / max(report["timings_s"]["total"], 1e-9))
    con.close()
    shutil.rmtree(out / ".duckdb_tmp", ignore_errors=True)
    return report


def summarize(con, events_in: int, stats: dict, demo_stats: dict, visit_stats: dict, code_stats: dict, tok_stats: dict,
              vocab_stats: dict, written: Written) -> dict:
    """Subjects and events in, kept, and dropped or repaired by reason."""
    q = lambda sql: con.execute(sql).fetchall()[0][0]
    n_subjects = q("SELECT count(*) FROM demo")
    tokenized = sum(written.per_split.values())
    no_birth = q("SELECT count(*) FROM demo_t WHERE birth IS NOT NULL AND birth_ok IS NULL")
    return {
        "subjects": {
            "in": n_subjects, "tokenized": tokenized, "per_split": written.per_split,
            "dropped": {"no_clinical_events": n_subjects - tokenized},
            "repaired": {"birth_after_first_visit (kept, age unknown)": no_birth},
        },
        "events": {
            "in": events_in, "tokenized": tok_stats["events_tokenized"],
            "rows_in_by_table": stats["rows_in"], "dropped": stats["dropped"], "repaired": stats["repaired"],
            "rare_code_events_dropped": code_stats["rare_code_events_dropped"],
            "rare_codes_dropped": code_stats["rare_codes_dropped"],
            **demo_stats,
        },
        "visits": {**visit_stats, "tokenized": tok_stats["visits_tokenized"]},
        "tokens": {"total": written.tokens, **vocab_stats},
    }

