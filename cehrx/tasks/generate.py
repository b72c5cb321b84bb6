"""`cehrx task=generate`: sample synthetic patients from a pretrained model; write MEDS and OMOP.

    cehrx task=generate model_dir=runs/mysite/model output_dir=runs/mysite/synthetic \\
          generate.num_patients=10000 sampling.top_p=0.95 sampling.temperature=1.0

Output (`output_dir`, default `<model_dir>/../synthetic`, renamed into place when complete):

    meds/               MEDS 0.4 dataset (data/<split>/0.parquet, metadata/{codes,subject_splits}.parquet, dataset.json)
    omop/<table>.parquet  OMOP CDM 5.4 tables (cehrx.generate.omop_writer), readable by `cehrx task=prepare data=omop`
    tokens/train/*.parquet  the patients as token shards (prompt included, no [END]); with vocab.json
                        this makes the output readable as a prepared dir (e.g. by `evaluate`)
    vocab.json          the model's vocabulary
    generate.json       counts, validity by reason, stop reasons, tokens/s, settings, timings
    config.yaml         resolved config of the run

Patients are sampled (`cehrx.sampling.Engine`, settings from the `sampling:` block) in shards of
`generate.shard_size` prompts. Each finished shard is saved under `.<output_dir name>.partial/`
beside the output; a crashed or killed run started again with the same settings resumes after the
last finished shard (`settings.json`, `cehrx.data.workdir.claim_work_dir`). Sampling stops when
`num_patients` valid patients exist (or after `num_patients * max_attempts_factor` samples). With
`generate.drop_train_copies` (default) a patient identical to a record of the prepared train split, as
evaluate's exact-copy rate compares them, is invalid (`copy_of_train`, `cehrx.generate.copies`).
"""

from __future__ import annotations

import hashlib
import math
import shutil
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from omegaconf import DictConfig, OmegaConf
from rich.console import Console

from cehrx.data import duck
from cehrx.data.atomic import link_or_copy
from cehrx.data.shards import TokenArrays, load_shard
from cehrx.data.vocab import Vocab
from cehrx.errors import CehrxError
from cehrx.generate.concepts import read_source_info
from cehrx.generate.copies import TrainRecords
from cehrx.generate.omop_writer import write_omop
from cehrx.generate.partial import SHARDS, Partial, drop_if_finished
from cehrx.generate.patients import (
    DROP_REASONS,
    TRUNCATED_KEY,
    decode_samples,
    take_prefixes,
)
from cehrx.generate.prompts import PromptPool, config_pool, empirical_pool
from cehrx.generate.staging import Stage
from cehrx.generate.windows import sample_windows
from cehrx.model.export import load_pretrained, resolve_device
from cehrx.model.export import model_dir as resolve_model_dir
from cehrx.sampling import STOP_NAMES, Engine, SamplingConfig
from cehrx.sampling.constraints import Grammar
from cehrx.tasks.inputs import prepared_dir_for
from cehrx.tasks.scaffold import guard, is_finished, recover_output, task_output, write_marker

# ------------------------------------------------------------------------ settings


def sampling_config(s: DictConfig, max_seq_len: int) -> SamplingConfig:
    """The `sampling:` block; the token budget resolved (null: what the model's context leaves after the
    prompt), so `settings.json` records the number."""
    room = max_seq_len - 4
    max_new = room if s.max_new_tokens is None else int(s.max_new_tokens)
    if max_new < 1 or max_new > room:
        raise CehrxError(
            f"sampling.max_new_tokens={s.max_new_tokens}: the model's max_seq_len={max_seq_len} leaves room for "
            f"1..{room} tokens after the 4-token prompt"
        )
    return SamplingConfig.from_mapping(s, max_new_tokens=max_new)


def model_fingerprint(model_dir: Path) -> str:
    """Identifies the exported weights (resume must not mix samples of two models)."""
    h = hashlib.sha256()
    for name in ("config.json", "export.json", "vocab.json"):
        f = model_dir / name
        if f.is_file():
            h.update(f.read_bytes())
    for name in ("model.safetensors", "model.pt"):
        f = model_dir / name
        if f.is_file():
            h.update(f"{f.stat().st_size}:{f.stat().st_mtime_ns}".encode())
    return h.hexdigest()[:16]


def shard_seed(seed: int, index: int) -> int:
    return int(np.random.SeedSequence([int(seed), int(index)]).generate_state(1)[0])


@dataclass
class ShardJob:
    """What every shard of a run samples with: the engine, the prompt pool, the `generate:` options."""

    engine: Engine
    grammar: Grammar  # on the CPU, for decoding
    pool: PromptPool
    g: DictConfig
    end_time: int | None = None  # records end here (`generate.end_date`)
    train: TrainRecords | None = None  # `generate.drop_train_copies`: drop copies of these records

    @property
    def progress(self) -> bool:
        return bool(self.g.progress)


def generate_shard(job: ShardJob, index: int, n_prompts: int, first_id: int, wanted: int) -> tuple[TokenArrays, dict]:
    """Sample `n_prompts` patients, decode them, keep at most `wanted` valid ones."""
    g, vocab = job.g, job.engine.vocab
    seed = shard_seed(job.engine.cfg.seed, index)
    prompts = job.pool.draw(n_prompts, np.random.default_rng(seed))
    start = time.perf_counter()
    samples = sample_windows(
        job.engine.with_settings(seed=seed),
        prompts,
        max_total_tokens=_int_or_none(g.get("max_total_tokens")),
        keep=_int_or_none(g.get("window_keep")),
        end_time=job.end_time,
        progress=job.progress,
    )
    seconds = time.perf_counter() - start
    ids = first_id + np.arange(n_prompts, dtype=np.int64)
    dec = decode_samples(
        vocab,
        prompts[samples.prompt_index],
        samples.tokens,
        samples.offsets,
        ids,
        seed,
        max_age=int(g.max_age),
        truncated=str(g.truncated),
        grammar=job.grammar,
        train=job.train,
    )
    arrays = dec.arrays
    surplus = max(len(arrays) - wanted, 0)
    if surplus:
        rows = np.arange(wanted)
        tokens, offsets = take_prefixes(arrays.tokens, arrays.offsets, rows, arrays.lengths()[:wanted])
        times, _ = take_prefixes(arrays.times, arrays.offsets, rows, arrays.lengths()[:wanted])
        arrays = TokenArrays(arrays.subject_id[:wanted], offsets, tokens, times, arrays.birth_time[:wanted])
    stats = {
        "shard": index,
        "samples": n_prompts,
        "valid": len(dec.arrays),
        "kept": len(arrays),
        "surplus": surplus,
        "dropped": dec.dropped,
        "repaired": dec.repaired,
        "stop": samples.stop_counts(),
        "generated_tokens": len(samples.tokens),
        "sampling_seconds": round(seconds, 3),
    }
    return arrays, stats


def data_end_time(value: Any, prepared: Path, windowed: bool) -> int | None:
    """`generate.end_date`: `auto` = the prepared train split's last event time when generating in windows
    (real records end there, at death or at the extract's end), else none; null = none; or a date."""
    if value is None or (value == "auto" and not windowed):
        return None
    if value == "auto":
        import pyarrow.compute as pc

        from cehrx.data.shards import read_split_table

        times = read_split_table(prepared, "train", columns=["times"]).column("times")
        return int(pc.max(pc.list_flatten(times)).as_py())
    try:
        return int(np.datetime64(str(value), "s").astype(np.int64))
    except ValueError as e:
        raise CehrxError(f"generate.end_date={value!r}: expected auto, null or a date like 2025-01-01") from e


def _int_or_none(v: Any) -> int | None:
    return None if v is None else int(v)


def plan_shard(requested: int, stats: list[dict], shard_size: int) -> int:
    """Prompts for the next shard: enough for the patients still missing at the validity seen so far."""
    attempts = sum(s["samples"] for s in stats)
    kept = sum(s["kept"] for s in stats)
    rate = sum(s["valid"] for s in stats) / attempts if attempts else 1.0
    missing = requested - kept
    need = missing if rate >= 1.0 else math.ceil(missing / max(rate, 0.05) * 1.05)
    return max(1, min(shard_size, need))


def sample_all(job: ShardJob, work: Partial, console: Console) -> tuple[list[dict], int]:
    """Generate shards until `num_patients` valid patients exist; finished shards are reused on resume.

    Returns the stats of every shard and how many were reused from an earlier, interrupted run.
    """
    from tqdm.auto import tqdm

    g = job.g
    requested = int(g.num_patients)
    stats = work.done()
    resumed = len(stats)
    max_samples = math.ceil(requested * float(g.max_attempts_factor))
    bar = tqdm(total=requested, desc="patients", unit="pt", disable=not job.progress, file=sys.stderr, position=0)
    bar.update(sum(s["kept"] for s in stats))
    if stats:
        console.print(f"resuming after {len(stats)} finished shard(s) in {work.dir}")
    try:
        while sum(s["kept"] for s in stats) < requested:
            attempts = sum(s["samples"] for s in stats)
            if attempts >= max_samples:
                console.print(
                    f"[yellow]stopped after {attempts} samples (generate.max_attempts_factor={g.max_attempts_factor}): "
                    f"{sum(s['kept'] for s in stats)} valid patients of {requested}[/yellow]"
                )
                break
            n = min(plan_shard(requested, stats, int(g.shard_size)), max_samples - attempts)
            wanted = requested - sum(s["kept"] for s in stats)
            arrays, st = generate_shard(job, len(stats), n, attempts + 1, wanted)
            work.save(len(stats), arrays, st)
            stats.append(st)
            bar.update(st["kept"])
            bar.set_postfix(
                tok_s=f"{st['generated_tokens'] / max(st['sampling_seconds'], 1e-9):.0f}",
                valid=f"{st['valid']}/{st['samples']}",
            )
    finally:
        bar.close()
    return stats, resumed


# ------------------------------------------------------------------------ the task


def run(cfg: DictConfig) -> dict:
    g = cfg.generate
    out = Path(str(cfg.output_dir))
    recover_output("generate", out)
    drop_if_finished(out, is_finished("generate", out))
    guard("generate", out, bool(cfg.overwrite))
    check_options(g)
    console = Console(stderr=True)
    t0 = time.perf_counter()
    if g.get("threads"):  # small models decode one token per step: fewer CPU threads often run faster
        torch.set_num_threads(int(g.threads))
    device = resolve_device(g.device, "generate.device")
    mdir = resolve_model_dir(cfg.model_dir)
    model, vocab = load_pretrained(mdir, map_location=device)
    prepared = prepared_dir_for(cfg, mdir)
    prompts = OmegaConf.to_container(g.prompts, resolve=True) if g.prompts is not None else None
    pool = config_pool(vocab, prompts) if prompts is not None else empirical_pool(prepared, vocab)
    job = ShardJob(
        engine=Engine(model, vocab, sampling_config(cfg.sampling, model.config.max_seq_len)),
        grammar=Grammar.build(vocab),
        pool=pool,
        g=g,
        end_time=data_end_time(g.get("end_date", "auto"), prepared, g.get("max_total_tokens") is not None),
        train=TrainRecords.load(prepared, vocab) if drop_train_copies(g) else None,
    )
    settings = run_settings(job, mdir, prepared, prompts, device)
    work = Partial(out, settings, bool(cfg.overwrite))
    stats, resumed = sample_all(job, work, console)
    t_sampled = time.perf_counter()
    with task_output(cfg, "generate") as tmp:
        outputs = assemble(cfg, vocab, mdir, prepared, work, tmp, console)
        report = summarize(stats, pool, settings, outputs, device)
        report["resumed_shards"] = resumed
        report["timings_s"] = {
            "load_and_sample": round(t_sampled - t0, 3),
            **outputs.pop("timings_s"),
            "total": round(time.perf_counter() - t0, 3),
        }
        report["outputs"] = outputs
        write_marker(tmp, "generate", report)
    shutil.rmtree(work.dir, ignore_errors=True)
    p = report["patients"]
    console.print(
        f"generated [bold]{p['generated']}[/bold] patients ({p['samples']} samples, {p['validity_rate']:.1%} valid), "
        f"{report['tokens']['per_second']:.0f} tokens/s -> {out}"
    )
    return report


def drop_train_copies(g: DictConfig) -> bool:
    return bool(g.get("drop_train_copies", True))


def check_options(g: DictConfig) -> None:
    if int(g.num_patients) < 1 or int(g.shard_size) < 1:
        raise CehrxError(
            f"generate.num_patients and generate.shard_size must be >= 1 (got {g.num_patients}, {g.shard_size})"
        )
    if str(g.truncated) not in ("keep", "drop"):
        raise CehrxError(f"generate.truncated must be keep or drop, got {g.truncated!r}")


def run_settings(job: ShardJob, mdir: Path, prepared: Path, prompts: Any, device: torch.device) -> dict:
    """Everything that decides the samples: `settings.json` of the partial dir (a resume must match it
    exactly, so keys and values stay as they are) and `generate.json`'s `settings`."""
    g = job.g
    return {
        "model": str(mdir.resolve()),
        "model_fingerprint": model_fingerprint(mdir),
        "prepared_dir": str(prepared.resolve()),
        "prompts": prompts,
        "sampling": job.engine.cfg.to_dict(),
        "num_patients": int(g.num_patients),
        "shard_size": int(g.shard_size),
        "max_age": int(g.max_age),
        "truncated": str(g.truncated),
        "max_total_tokens": _int_or_none(g.get("max_total_tokens")),
        "window_keep": _int_or_none(g.get("window_keep")),
        "end_time": job.end_time,
        "max_attempts_factor": float(g.max_attempts_factor),
        "drop_train_copies": drop_train_copies(g),
        "device_type": device.type,
    }


def assemble(
    cfg: DictConfig, vocab: Vocab, mdir: Path, prepared: Path, work: Partial, tmp: Path, console: Console
) -> dict:
    """Token shards, vocab.json, MEDS and OMOP from the finished shards, into `tmp`."""
    t0 = time.perf_counter()
    (tmp / SHARDS).mkdir(parents=True)
    for f in work.shard_files():  # hard links: the partial dir stays intact until the output is in place
        link_or_copy(f, tmp / SHARDS / f.name)
    shutil.copyfile(mdir / "vocab.json", tmp / "vocab.json")
    g = cfg.generate
    con = duck.connect(str(g.duckdb.memory_limit), g.duckdb.threads, temp_dir=tmp / ".duckdb_tmp")
    try:
        stage = Stage(con, vocab)
        for i, f in enumerate(work.shard_files()):
            stage.add(load_shard(f), seed=shard_seed(int(cfg.sampling.seed), 10_000 + i))
        info = read_source_info(prepared, con, stage.keys())
        codes = stage.finish(info)
        t1 = time.perf_counter()
        with console.status("writing MEDS ..."):
            meds_rows = stage.write_meds(tmp / "meds", f"cehrx synthetic ({prepared.name})")
        t2 = time.perf_counter()
        with console.status("writing OMOP ..."):
            omop_rows = write_omop(con, tmp / "omop", int(g.omop.type_concept_id), info.omop_path, str(g.omop.concepts))
        t3 = time.perf_counter()
    finally:
        con.close()
        shutil.rmtree(tmp / ".duckdb_tmp", ignore_errors=True)
    return {
        "meds_rows": meds_rows,
        "omop_rows": omop_rows,
        "codes": codes,
        "concept_source": info.omop_path,
        "timings_s": {"decode": round(t1 - t0, 3), "write_meds": round(t2 - t1, 3), "write_omop": round(t3 - t2, 3)},
    }


def summarize(stats: list[dict], pool: PromptPool, settings: dict, outputs: dict, device: torch.device) -> dict:
    """generate.json: counts, validity by reason, stop reasons, tokens/s, settings."""
    total = lambda key: sum(s[key] for s in stats)
    samples, valid = total("samples"), total("valid")
    gen_tokens, secs = total("generated_tokens"), total("sampling_seconds")
    return {
        "patients": {
            "requested": settings["num_patients"],
            "generated": total("kept"),
            "complete": total("kept") == settings["num_patients"],
            "samples": samples,
            "valid": valid,
            "validity_rate": valid / samples if samples else 0.0,
            "surplus_unused": total("surplus"),
            "dropped": {r: sum(s["dropped"].get(r, 0) for s in stats) for r in DROP_REASONS},
            "repaired": {TRUNCATED_KEY: sum(s["repaired"].get(TRUNCATED_KEY, 0) for s in stats)},
        },
        "stop": {name: sum(s["stop"].get(name, 0) for s in stats) for name in STOP_NAMES},
        "tokens": {
            "generated": gen_tokens,
            "sampling_seconds": round(secs, 3),
            "per_second": gen_tokens / secs if secs else 0.0,
            "mean_per_sample": gen_tokens / samples if samples else 0.0,
        },
        "shards": len(stats),
        "prompts": pool.summary(),
        "settings": {**settings, "device": str(device)},
    }
