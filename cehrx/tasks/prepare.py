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
from collections import Counter
from pathlib import Path

from omegaconf import DictConfig, OmegaConf
from rich.console import Console

from cehrx.data import duck
from cehrx.data.meds_source import meds_to_events
from cehrx.data.omop_mapping import OPTIONAL_TABLES
from cehrx.data.omop_tables import open_omop
from cehrx.data.omop_to_meds import omop_to_events
from cehrx.data.shard_writer import Written, length_percentiles, write_shards
from cehrx.data.sharding import Shard, duckdb_limit, parse_bytes
from cehrx.data.splits import assign_splits, load_split_file
from cehrx.data.token_order import fetch_ordered, learn_value_edges, order_visits, select_codes
from cehrx.data.tokenize import Resolver, token_ids
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

log = logging.getLogger("cehrx.prepare")


def run(cfg: DictConfig) -> dict:
    """One pass over the whole data (the default, and what small data gets), or the sharded path
    (`prepare_sharded`: `task.shards` > 1, a memory budget the data exceeds, or a `task.stage`/`task.shard` job)."""
    from cehrx.tasks import prepare_sharded
    from cehrx.tasks.scaffold import task_output, write_marker  # not at import: shard workers need no torch

    shards = prepare_sharded.resolve_shards(cfg)
    if shards > 1 or cfg.task.get("shard") is not None or cfg.task.get("stage"):
        return prepare_sharded.run(cfg, shards)
    out = Path(cfg.output_dir)
    with task_output(cfg, "prepare") as tmp:
        report = prepare(cfg, tmp)
        write_marker(tmp, "prepare", report)
    announce(report, out)
    return report


def announce(report: dict, out: Path) -> None:
    """The warnings, then one line on what was prepared where."""
    log.info("prepared %s subjects into %s", report["subjects"]["tokenized"], out)
    console = Console(stderr=True)
    for warning in report["warnings"]:
        console.print(f"[bold yellow]warning:[/bold yellow] {warning}", highlight=False)
    console.print(
        f"prepared [bold]{report['subjects']['tokenized']}[/bold] subjects, "
        f"{report['events']['tokenized']} events, vocab {report['vocab']['size']} -> {out}"
    )


NO_EVENTS = "nothing to prepare in {path}: no row became an event"
NO_BODY = "no clinical events in {path}: every event is a birth, death, gender, race, visit or static code"


def prepare(cfg: DictConfig, out: Path) -> dict:
    """The whole pipeline on one DuckDB connection; returns the prepare.json report. Refuses (DataError) to
    finish an output without a subject or clinical event: a wrong input or setting, that would only fail later."""
    t = cfg.task
    stages = Stages(total=8 if cfg.data.source == "omop" else 7)
    start = time.perf_counter()
    con = duck.connect(memory_limit(t), t.duckdb.threads, temp_dir=out / ".duckdb_tmp")
    source, report = cfg.data.source, source_report(cfg)
    with stages("read source -> MEDS events"):
        stats, events_in = read_events(con, cfg, report)
    require(events_in, NO_EVENTS.format(path=cfg.data.path), stats)
    with stages("splits"):
        report["splits"] = split_subjects(con, t.splits, bool(stats.get("source_splits")))
    if source == "omop":
        with stages("write MEDS dataset"):
            write_meds(con, out / "meds", cfg.data.name)
    with stages("visits"):
        demo_stats, visit_stats = build_visits(con, cfg, stats)
    with stages("vocabulary codes and value deciles"):
        code_stats = select_codes(con, int(t.min_subjects))
        require_kept_codes(con, int(t.min_subjects), report["splits"])
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
        vocab = make_vocab(con, tokens, written.counts, written.subjects, vocab_meta(t, source, inpatient))
        vocab.save(out / "vocab.json")
    tok_stats = {"visits_tokenized": len(ordered.est_us), "events_tokenized": len(ordered.t_us)}
    vocab_stats = {"structural_tokens_not_in_vocab": dict(sorted(resolver.not_in_vocab.items()))}
    demo_counts = subject_counts(con)
    report.update(
        summarize(events_in, stats, demo_counts, demo_stats, visit_stats, code_stats, tok_stats, vocab_stats, written)
    )
    finish_report(report, t, len(vocab), n_edges, Counter(vocab.kinds), written.lengths)
    report["timings_s"] = {**stages.timings, "total": round(time.perf_counter() - start, 3)}
    report["events"]["per_second"] = round(report["events"]["in"] / max(report["timings_s"]["total"], 1e-9))
    con.close()
    shutil.rmtree(out / ".duckdb_tmp", ignore_errors=True)
    return report


def memory_limit(t: DictConfig) -> str:
    """DuckDB's memory_limit: the share of `task.memory_budget` when one is set, else `task.duckdb.memory_limit`."""
    budget = parse_bytes(t.get("memory_budget"))
    return duckdb_limit(budget) if budget else t.duckdb.memory_limit


def source_report(cfg: DictConfig) -> dict:
    return {"source": {"kind": cfg.data.source, "path": str(cfg.data.path)}}


def read_events(
    con, cfg: DictConfig, report: dict, shard: Shard | None = None, parts: Path | None = None
) -> tuple[dict, int]:
    """`events` and `code_meta` from the source (one shard's subjects, or all); the source stats and events in.
    `parts`: the sharded prepare's copy of the source's tables (`omop_tables.partition`)."""
    stats = read_source(con, cfg, report, shard, parts)
    return stats, con.execute("SELECT count(*) FROM events").fetchall()[0][0]


def build_visits(con, cfg: DictConfig, stats: dict | None) -> tuple[dict, dict]:
    """`demo`, `body` and the visits every body event belongs to; `events` is dropped. `stats` given: refuse
    a run without body events (a shard may have none: its caller checks the sum)."""
    demo_stats = build_demographics(con, cfg.data)
    n_body = build_body(con, cfg.data)
    if stats is not None:
        require(n_body, NO_BODY.format(path=cfg.data.path), stats)
    build_source_visits(con, cfg.data.source, OmegaConf.to_container(cfg.data.visits) if cfg.data.get("visits") else [])
    con.execute("DROP TABLE events")  # the rest works on body/demo/src_visits: free memory before the big sorts
    visit_stats = attach_events(con)
    visit_stats["_body_events"] = n_body  # for the caller; summarize leaves it out
    return demo_stats, visit_stats


def subject_counts(con) -> dict:
    """Subjects with any event (`demo`), and those whose birth is after their first visit (kept, age unknown)."""
    q = lambda sql: con.execute(sql).fetchall()[0][0]  # noqa: E731
    return {
        "demo": q("SELECT count(*) FROM demo"),
        "no_birth": q("SELECT count(*) FROM demo_t WHERE birth IS NOT NULL AND birth_ok IS NULL"),
    }


def finish_report(report: dict, t: DictConfig, size: int, n_edges: int, by_kind: Counter, lengths) -> None:
    """Warnings, the vocabulary summary and the token length percentiles, after the counts."""
    report["warnings"] = warnings(report, int(t.min_subjects))
    report["vocab"] = {"size": size, "codes_with_value_deciles": n_edges, "by_kind": by_kind}
    report["tokens"]["length"] = length_percentiles(lengths)


def split_subjects(con, splits: DictConfig, source_splits: bool) -> dict:
    """`subject_split`: the user's splits file, else the source's own splits, else the hash split."""
    split_file = splits.get("file")
    if split_file:  # the user's file wins over the dataset's own splits
        load_split_file(con, str(split_file), strict=True)
    fractions = {k: float(splits[k]) for k in ("train", "tuning", "held_out")}
    report = assign_splits(con, fractions, str(splits.salt), use_source=bool(split_file or source_splits))
    if split_file:
        report.update(method="file", file=str(split_file))
    return report


def vocab_meta(t: DictConfig, source: str, inpatient: list[str]) -> dict:
    """The settings vocab.json records, which later tasks read back."""
    return {
        "source_kind": source,
        "min_subjects": int(t.min_subjects),
        "num_bins": int(t.quantiles.num_bins),
        "max_gap_days": int(t.max_gap_days),
        "prompt": ["YEAR", "AGE", "GENDER", "RACE"],
        "inpatient_visit_types": inpatient,
    }


def read_source(con, cfg: DictConfig, report: dict, shard: Shard | None = None, parts: Path | None = None) -> dict:
    """Fill `events` and `code_meta` from the OMOP or MEDS source; the table listing goes to `report`.

    With a `shard`, only its subjects are read, and `report["tables"]["sharded"]` names the tables whose
    `rows` are that shard's (the others, like `concept`, are read whole by every shard)."""
    if cfg.data.source == "omop":
        tables = open_omop(con, str(cfg.data.path), shard, parts)
        stats = omop_to_events(con, tables, current_year=dt.date.today().year)
        report["tables"] = {
            "found": sorted(tables.columns),
            "rows": tables.rows,
            "missing_optional": sorted(set(OPTIONAL_TABLES) - set(tables.columns)),
            "empty": sorted(k for k, v in tables.rows.items() if v == 0 and k in OPTIONAL_TABLES),
        }
        if shard is not None:
            report["tables"]["sharded"] = tables.sharded
        return stats
    if cfg.data.source == "meds":
        return meds_to_events(con, str(cfg.data.path), shard)
    raise DataError(f"data.source must be 'omop' or 'meds', got {cfg.data.source!r}")


def require(n: int, message: str, stats: dict) -> None:
    """Refuse to go on with nothing left (`message` says what), adding where the source rows went."""
    if not n:
        raise DataError(f"{message} ({source_counts(stats)})")


def source_counts(stats: dict) -> str:
    """The source rows in and dropped by reason, per table, as one line for an error message."""
    parts = []
    for table, n in stats["rows_in"].items():
        dropped = ", ".join(f"{reason} {k}" for reason, k in stats["dropped"].get(table, {}).items())
        parts.append(f"{table}: {n} rows" + (f", dropped {dropped}" if dropped else ""))
    return "; ".join(parts) or "no source rows"


def require_kept_codes(con, min_subjects: int, splits: dict) -> None:
    """Refuse a vocabulary without a clinical code, naming task.min_subjects and what would keep some.

    A code is kept when at least `min_subjects` train subjects have it, so a small input (or one
    without train subjects) can lose every code; the output would be sequences of empty visits.
    """
    if con.execute("SELECT count(*) FROM kept_codes").fetchall()[0][0]:
        return
    n_codes, most = con.execute("""
        SELECT count(*), coalesce(max(n), 0) FROM (
            SELECT cid, count(DISTINCT subject_id) AS n FROM body JOIN demo USING (subject_id) WHERE split = 'train' GROUP BY cid)
    """).fetchall()[0]
    refuse_no_codes(n_codes, most, min_subjects, splits)


def refuse_no_codes(n_codes: int, most: int, min_subjects: int, splits: dict) -> None:
    """The error for a run that keeps no code: `n_codes` codes have train subjects, the most common `most` of them."""
    if not n_codes:
        raise DataError(
            f"no train subject has a clinical event (subjects per split: {splits['subjects']}), so no code "
            "can be kept: check task.splits.train or the splits file"
        )
    n_train = int(splits["subjects"].get("train", 0))
    raise DataError(
        f"no clinical code is kept: each of the {n_codes} codes of the {n_train} train subjects is in fewer than "
        f"task.min_subjects={min_subjects} of them (at most {most}), so the output would hold no clinical event; "
        f"lower it (task.min_subjects={int(most)}) or prepare more subjects"
    )


def warnings(report: dict, min_subjects: int) -> list[str]:
    """Loud notes on a finished output that kept little: most clinical events dropped as rare codes, or
    most rows of a source table dropped (the reasons are in prepare.json)."""
    out = []
    ev = report["events"]
    rare, body = ev["rare_code_events_dropped"], ev["tokenized"] + ev["rare_code_events_dropped"]
    if rare * 2 > body:
        out.append(
            f"{rare} of {body} clinical events ({100 * rare / body:.0f}%) are codes in fewer than task.min_subjects="
            f"{min_subjects} train subjects and were dropped; lower task.min_subjects for a small data set"
        )
    for table, n in ev["rows_in_by_table"].items():
        dropped = sum(ev["dropped"].get(table, {}).values())
        if n and dropped * 2 > n:
            out.append(
                f"{dropped} of {n} rows of {table} were dropped ({', '.join(ev['dropped'][table])}); see prepare.json"
            )
    for w in out:
        log.warning(w)
    return out


# What became of the MEDS events that are not code tokens (visits.ROLES), as prepare.json names them.
ROLE_NAMES = {
    "birth": "birth (prompt AGE)",
    "death": "death ([DEATH])",
    "gender": "gender (prompt GENDER)",
    "race": "race (prompt RACE)",
    "visit_start": "visit_start (VISIT token)",
    "visit_discharge": "visit_discharge (DISCHARGE token)",
    "static": "static, not in the prompt",
}


def not_code_tokens(roles: dict, visit_stats: dict, code_stats: dict) -> dict:
    """MEDS events that are not code tokens, by reason: in the prompt, a visit, discharge or death token, or dropped."""
    out = {ROLE_NAMES[r]: n for r, n in roles.items()}
    out["start_code_replaced_by_visit_token"] = visit_stats.get("start_codes_replaced_by_visit_token", 0)
    out["end_code_made_discharge_token"] = visit_stats.get("end_codes_made_discharge_tokens", 0)
    out["rare_code (in < task.min_subjects train subjects)"] = code_stats["rare_code_events_dropped"]
    return {k: v for k, v in out.items() if v}


def summarize(
    events_in: int,
    stats: dict,
    demo_counts: dict,
    demo_stats: dict,
    visit_stats: dict,
    code_stats: dict,
    tok_stats: dict,
    vocab_stats: dict,
    written: Written,
) -> dict:
    """Subjects and events in, kept, and dropped or repaired by reason.

    Both balance: subjects in = tokenized + dropped by reason, MEDS events in = code tokens +
    `not_code_tokens` by reason, and per source table rows in = rows kept + rows dropped by reason.
    Takes counts only (`subject_counts`), so the sharded path can pass the sums over its shards.
    """
    n_demo = demo_counts["demo"]
    n_subjects = stats.get("subjects", n_demo)  # OMOP: every person kept, also those without any event
    tokenized = sum(written.per_split.values())
    visit_stats = {k: v for k, v in visit_stats.items() if not k.startswith("_")}
    return {
        "subjects": {
            "in": n_subjects,
            "tokenized": tokenized,
            "per_split": written.per_split,
            "dropped": {
                **({"no_events": n_subjects - n_demo} if n_subjects != n_demo else {}),
                "no_clinical_events": n_demo - tokenized,
            },
            "repaired": {"birth_after_first_visit (kept, age unknown)": demo_counts["no_birth"]},
        },
        "events": {
            "in": events_in,
            "tokenized": tok_stats["events_tokenized"],
            "not_code_tokens": not_code_tokens(demo_stats["roles"], visit_stats, code_stats),
            "rows_in_by_table": stats["rows_in"],
            "rows_kept_by_table": stats["kept"],
            "dropped": stats["dropped"],
            "repaired": stats["repaired"],
            "rare_code_events_dropped": code_stats["rare_code_events_dropped"],
            "rare_codes_dropped": code_stats["rare_codes_dropped"],
            "static_events_not_in_prompt": demo_stats["static_events_not_in_prompt"],
        },
        "visits": {**visit_stats, "tokenized": tok_stats["visits_tokenized"]},
        "tokens": {"total": written.tokens, **vocab_stats},
    }
