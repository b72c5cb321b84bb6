"""Benchmark the sharded `cehrx task=prepare` (#25): peak RSS of every worker against the memory
budget, wall time, events/s and disk use, at scales up to ~100 M events.

    python experiments/bench/bench_prepare_sharded.py --scales 1 --workers 2            # smoke (GiBleed as is)
    python experiments/bench/bench_prepare_sharded.py --scales 40 450 --budget 4GB --workers 16 --workdir /scratch/b

For every scale k the OMOP GiBleed set (~0.23 M events in) is copied k times under new ids
(`scale_omop.py`, in --workdir; x450 is ~100 M events), then the real CLI runs in a fresh process:

    python -m cehrx task=prepare data=omop data.path=<scaled> output_dir=<out> overwrite=true \
        task.memory_budget=<budget> task.workers=<n> task.keep_work=true [task.shards=<s>]

Measured: wall and CPU time of the whole run (through `bench_prepare.run_prepare`'s wrapper); the
peak RSS over every process of the run (the wrapper's RUSAGE_CHILDREN: the largest single process,
driver or worker); per shard job, the peak RSS its process had reached when the job ended (`done.json`
of each job, `peak_rss_mib`); disk: the output, the work dir (every stage's files are kept until the
output is finished, so its size is the peak of the work besides DuckDB's spill files) and the source.
Target: every worker under the budget (4 GB) at every scale. Results go to --results (JSON) and a
markdown table on stdout. With --check-single, the single pass also runs and the outputs are compared
(token shards, vocab.json, MEDS copy byte for byte): only sensible where one process holds the data.
"""

from __future__ import annotations

import argparse
import filecmp
import json
import os
import shutil
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from bench_prepare import DEFAULT_SRC, dir_mib, run_prepare
from scale_omop import cached, scale_omop

GIB = 2**30


def job_peaks(work: Path) -> dict[str, int]:
    """Max `peak_rss_mib` over the jobs of each stage (map, visits, tokens) and the reduce jobs."""
    out: dict[str, int] = {}
    for marker in work.glob("*/**/done.json"):
        stage = marker.relative_to(work).parts[0]
        peak = json.loads(marker.read_text()).get("peak_rss_mib", 0)
        out[stage] = max(out.get(stage, 0), peak)
    return out


def same_output(a: Path, b: Path) -> list[str]:
    """Files that differ between two prepared dirs (prepare.json, config.yaml, dataset.json aside)."""
    skip = {"prepare.json", "config.yaml", "dataset.json"}
    files = sorted(p.relative_to(a) for p in a.rglob("*") if p.is_file() and p.name not in skip)
    return [str(f) for f in files if not (b / f).is_file() or not filecmp.cmp(a / f, b / f, shallow=False)]


def bench_scale(k: int, args: argparse.Namespace, root: Path) -> dict:
    data = root / f"omop_x{k}"
    t0 = time.perf_counter()
    if cached(args.src, data, k) is None:
        scale_omop(args.src, data, k)
    scale_s = time.perf_counter() - t0
    out = root / f"prepared_x{k}"
    work = root / f".prepared_x{k}.shards"
    shutil.rmtree(work, ignore_errors=True)
    extra = [f"task.memory_budget={args.budget}", f"task.workers={args.workers}", "task.keep_work=true"]
    extra += [f"task.shards={args.shards}"] if args.shards else []
    r = run_prepare(data, out, root / f"prepare_x{k}.log", extra)
    rep = r["report"]
    plan = json.loads((work / "plan.json").read_text()) if (work / "plan.json").is_file() else {"shards": 1}
    row = {
        "scale": k,
        "events_in": rep["events"]["in"],
        "subjects": rep["subjects"]["tokenized"],
        "shards": plan["shards"],
        "workers": args.workers,
        "budget": args.budget,
        "wall_s": round(r["wall_s"], 1),
        "cpu_s": round(r["user_s"] + r["sys_s"], 1),
        "events_per_s": round(rep["events"]["in"] / r["wall_s"]),
        "peak_rss_mib_any_process": round(r["maxrss_kib"] / 1024),
        "peak_rss_mib_by_stage": job_peaks(work) if work.is_dir() else {},
        "disk_mib": {
            "source": round(dir_mib(data)),
            "output": round(dir_mib(out)),
            "work": round(dir_mib(work)) if work.is_dir() else 0,
        },
        "timings_s": rep["timings_s"],
        "scale_s": round(scale_s, 1),
    }
    budget_mib = parse_budget(args.budget) / 2**20
    row["under_budget"] = row["peak_rss_mib_any_process"] <= budget_mib
    if args.check_single:
        single = root / f"single_x{k}"
        s = run_prepare(data, single, root / f"single_x{k}.log", [])
        row["single_wall_s"], row["single_peak_rss_mib"] = round(s["wall_s"], 1), round(s["maxrss_kib"] / 1024)
        row["differs_from_single"] = same_output(single, out)
        shutil.rmtree(single, ignore_errors=True)
    if not args.keep:
        shutil.rmtree(out, ignore_errors=True)
        shutil.rmtree(work, ignore_errors=True)
    return row


def parse_budget(text: str) -> int:
    from cehrx.data.sharding import parse_bytes

    return parse_bytes(text)


def print_table(rows: list[dict]) -> None:
    print(
        "\n| scale | events in | shards | workers | wall s | events/s | peak RSS MiB (any process) | by stage | disk MiB (src/out/work) | under budget |"
    )
    print("|---:|---:|---:|---:|---:|---:|---:|---|---|---|")
    for r in rows:
        d = r["disk_mib"]
        print(
            f"| x{r['scale']} | {r['events_in']:,} | {r['shards']} | {r['workers']} | {r['wall_s']} | {r['events_per_s']:,} | "
            f"{r['peak_rss_mib_any_process']:,} | {r['peak_rss_mib_by_stage']} | {d['source']}/{d['output']}/{d['work']} | {r['under_budget']} |"
        )


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--scales", type=int, nargs="+", default=[1, 40, 450])
    p.add_argument("--budget", default="4GB")
    p.add_argument("--workers", type=int, default=os.cpu_count() or 1)
    p.add_argument("--shards", type=int, default=None, help="default: chosen from the data size and the budget")
    p.add_argument("--src", type=Path, default=DEFAULT_SRC)
    p.add_argument("--workdir", type=Path, default=Path("/tmp/cehrx_bench_sharded"))
    p.add_argument("--results", type=Path, default=None)
    p.add_argument("--check-single", action="store_true")
    p.add_argument("--keep", action="store_true")
    args = p.parse_args()
    args.workdir.mkdir(parents=True, exist_ok=True)
    rows = []
    for k in args.scales:
        rows.append(bench_scale(k, args, args.workdir))
        print(json.dumps(rows[-1], indent=1), flush=True)
    print_table(rows)
    if args.results:
        args.results.write_text(json.dumps(rows, indent=1) + "\n")
    return 0 if all(r["under_budget"] for r in rows) else 1


if __name__ == "__main__":
    raise SystemExit(main())
