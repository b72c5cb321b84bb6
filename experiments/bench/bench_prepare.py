"""Benchmark `cehrx task=prepare` end to end (OMOP parquet -> MEDS + token shards) at several scales.

    python experiments/bench/bench_prepare.py                      # x1 (as is), x10, x20, x40
    python experiments/bench/bench_prepare.py --scales 10 20 40 --workdir /tmp/cehrx_bench --keep

For every scale k the OMOP GiBleed set is copied k times under new ids (scale_omop.py, in
--workdir, never in the repository), then the real CLI runs in a fresh subprocess:

    python -m cehrx task=prepare data=omop data.path=<scaled> output_dir=<tmp> overwrite=true

Each run goes through a small wrapper process that starts the CLI, waits for it and reports
getrusage(RUSAGE_CHILDREN).ru_maxrss: since the wrapper has exactly one child, that is the peak
RSS of that prepare run alone (not a max over earlier scales). Wall time is measured in the
wrapper around the CLI, so it includes interpreter start-up and imports. Events in, subjects kept
and per-stage timings are read from the run's prepare.json. The 2 cores may be shared with other
jobs: the 1-minute load average before each run is recorded (it includes this benchmark's own
previous run), CPU seconds of the child are reported (less sensitive to contention than wall
time), and --repeat N reports the fastest run.

Targets (2-core machine): >= 500,000 events/s end to end at x40 (the issue's ~10 M-event scale;
smaller scales are reported too), peak RSS < 4 GiB, time linear in patients (time(x40)/time(x10)
close to 4.0).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from scale_omop import cached, scale_omop

REPO = Path(__file__).resolve().parents[2]
DEFAULT_SRC = REPO.parent / "shared" / "data" / "omop_eunomia_gibleed" / "parquet"  # ../shared beside the project
TARGET_EPS = 500_000
TARGET_RSS_MIB = 4096
# Reference (quoted from the issue, not re-measured): CEHR-GPT Spark ETL on GiBleed as is.
SPARK_REF = {"wall_s": 40.0, "rss_mib": 1.8 * 1000**3 / 2**20, "subjects_kept": 584, "subjects_in": 2694}

WRAPPER = r"""
import json, resource, subprocess, sys, time
t0 = time.perf_counter()
with open(sys.argv[1], "wb") as log:
    rc = subprocess.call(sys.argv[2:], stdout=log, stderr=subprocess.STDOUT)
wall = time.perf_counter() - t0
ru = resource.getrusage(resource.RUSAGE_CHILDREN)
print(json.dumps({"rc": rc, "wall_s": wall, "maxrss_kib": ru.ru_maxrss, "user_s": ru.ru_utime, "sys_s": ru.ru_stime}))
"""


def run_prepare(data_path: Path, out_dir: Path, log_path: Path, extra: list[str], code: Path | None = None) -> dict:
    """Run the prepare CLI in a fresh wrapper process; return wall, peak RSS and prepare.json.

    `code`: run the cehrx source tree at this path instead of the installed one (PYTHONPATH).
    """
    cmd = [
        sys.executable,
        "-m",
        "cehrx",
        "task=prepare",
        "data=omop",
        f"data.path={data_path}",
        f"output_dir={out_dir}",
        "overwrite=true",
        *extra,
    ]
    env = dict(os.environ, PYTHONUNBUFFERED="1")
    if code is not None:
        env["PYTHONPATH"] = str(Path(code).resolve())
    # run from the work dir so Hydra's run dirs / logs land there, not in the repository
    res = subprocess.run(
        [sys.executable, "-c", WRAPPER, str(log_path), *cmd],
        capture_output=True,
        text=True,
        cwd=out_dir.parent,
        env=env,
        check=False,
    )
    if res.returncode != 0 or not res.stdout.strip():
        raise RuntimeError(f"wrapper failed: {res.stderr}")
    m = json.loads(res.stdout.strip().splitlines()[-1])
    if m["rc"] != 0:
        raise RuntimeError(f"prepare failed (rc={m['rc']}), log: {log_path}\n" + log_path.read_text()[-3000:])
    report = json.loads((out_dir / "prepare.json").read_text())
    return {"cmd": cmd, **m, "report": report}


def summary_row(k: int, runs: list[tuple[dict, float]], scale_s: float, out: Path) -> dict:
    """The fastest of `runs` (wall), with peak RSS over all of them."""
    r, load = min(runs, key=lambda x: x[0]["wall_s"])
    rep = r["report"]
    ev = rep["events"]["in"]
    return {
        "scale": k,
        "persons_in": rep["subjects"]["in"],
        "subjects_kept": rep["subjects"]["tokenized"],
        "events_in": ev,
        "events_tokenized": rep["events"]["tokenized"],
        "wall_s": round(r["wall_s"], 2),
        "wall_s_all": [round(x["wall_s"], 2) for x, _ in runs],
        "cpu_s_all": [round(x["user_s"] + x["sys_s"], 1) for x, _ in runs],
        "loadavg_1m_before": round(load, 2),
        "prepare_total_s": rep["timings_s"]["total"],
        "events_per_s": round(ev / r["wall_s"]),
        "peak_rss_mib": round(max(x["maxrss_kib"] for x, _ in runs) / 1024),
        "cpu_s": round(r["user_s"] + r["sys_s"], 1),
        "tokens": rep["tokens"]["total"],
        "vocab": rep["vocab"]["size"],
        "output_mib": round(dir_mib(out), 1) if out.exists() else None,
        "scale_s": round(scale_s, 1),
        "timings_s": rep["timings_s"],
        "cmd": " ".join(r["cmd"]),
    }


def dir_mib(p: Path) -> float:
    return sum(f.stat().st_size for f in p.rglob("*") if f.is_file()) / 2**20


def print_table(rows: list[dict]) -> None:
    print(
        "\n| scale | persons | events in | wall s | prepare s | events/s | CPU s | peak RSS MiB | subjects kept | load before |"
    )
    print("|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|")
    for r in rows:
        print(
            f"| x{r['scale']} | {r['persons_in']:,} | {r['events_in']:,} | {r['wall_s']:.2f} | {r['prepare_total_s']:.2f} | "
            f"{r['events_per_s']:,} | {r['cpu_s']:.1f} | {r['peak_rss_mib']:,} | {r['subjects_kept']:,} | {r['loadavg_1m_before']:.1f} |"
        )


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument(
        "--scales",
        type=int,
        nargs="+",
        default=[10, 20, 40],
        help="copies of GiBleed to benchmark besides x1 (default: 10 20 40)",
    )
    ap.add_argument("--no-x1", action="store_true", help="skip the x1 run (GiBleed as is)")
    ap.add_argument("--src", type=Path, default=DEFAULT_SRC, help="OMOP parquet folder to scale")
    ap.add_argument(
        "--workdir",
        type=Path,
        default=None,
        help="where scaled data and outputs go (default: a new temp dir, removed unless --keep)",
    )
    ap.add_argument("--keep", action="store_true", help="keep the work dir (scaled OMOP sets are reused next time)")
    ap.add_argument(
        "--repeat",
        type=int,
        default=1,
        help="runs per scale; the fastest is reported (the machine is shared), peak RSS is the max",
    )
    ap.add_argument("--json", type=Path, default=None, help="also write all results to this JSON file")
    ap.add_argument("--override", action="append", default=[], help="extra Hydra override for prepare (repeatable)")
    ap.add_argument(
        "--baseline",
        type=Path,
        default=None,
        help="also run this cehrx source tree (e.g. `git archive <commit> | tar -x -C DIR`), alternating "
        "run by run with the current code, and print both plus their CPU/wall ratios",
    )
    args = ap.parse_args()

    src = args.src.resolve()
    workdir = (args.workdir or Path(tempfile.mkdtemp(prefix="cehrx_bench_"))).resolve()
    if REPO in workdir.parents or workdir == REPO:
        ap.error(f"--workdir must be outside the repository ({REPO})")
    workdir.mkdir(parents=True, exist_ok=True)
    scales = ([] if args.no_x1 else [1]) + [k for k in args.scales if k != 1]
    import duckdb  # only for the version line

    machine = {
        "cpus": os.cpu_count(),
        "ram_gib": round(os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") / 2**30, 1),
        "python": platform.python_version(),
        "duckdb": duckdb.__version__,
        "platform": platform.platform(),
    }
    print(f"machine: {machine}\nsource: {src}\nworkdir: {workdir}", flush=True)

    rows, baseline_rows = [], []
    t_all = time.perf_counter()
    try:
        for k in scales:
            if k == 1:
                data, scale_s = src, 0.0
            else:
                data = workdir / f"omop_x{k}"
                s = cached(src, data, k)
                if s is None:
                    t0 = time.perf_counter()
                    s = scale_omop(src, data, k)
                    scale_s = time.perf_counter() - t0
                else:
                    scale_s = 0.0
            out = workdir / f"prepared_x{k}"
            runs, base_runs = [], []
            for i in range(max(args.repeat, 1)):
                load = os.getloadavg()[0]
                runs.append((run_prepare(data, out, workdir / f"prepare_x{k}.log", args.override), load))
                if args.baseline is not None:  # alternate, so load from other jobs hits both alike
                    load = os.getloadavg()[0]
                    base_runs.append(
                        (
                            run_prepare(
                                data,
                                workdir / f"baseline_x{k}",
                                workdir / f"baseline_x{k}.log",
                                args.override,
                                code=args.baseline,
                            ),
                            load,
                        )
                    )
            if base_runs:
                baseline_rows.append(summary_row(k, base_runs, 0.0, workdir / f"baseline_x{k}"))
            row = summary_row(k, runs, scale_s, out)
            ev = row["events_in"]
            rows.append(row)
            print(
                f"x{k:<3} events {ev:>10,}  wall {row['wall_s']:7.2f}s  {row['events_per_s']:>9,} ev/s  "
                f"peak RSS {row['peak_rss_mib']:>6,} MiB  kept {row['subjects_kept']:,}/{row['persons_in']:,}  "
                f"(runs {row['wall_s_all']}, load {row['loadavg_1m_before']})",
                flush=True,
            )
            if not args.keep:
                shutil.rmtree(out, ignore_errors=True)
    finally:
        if not args.keep:
            shutil.rmtree(workdir, ignore_errors=True)
    total_s = time.perf_counter() - t_all

    print_table(rows)
    if baseline_rows:
        print(f"\nbaseline {args.baseline} (alternating with the runs above):")
        print_table(baseline_rows)
        print("\n| scale | CPU s baseline -> current | wall s baseline -> current | CPU speed-up | wall speed-up |")
        print("|---:|---:|---:|---:|---:|")
        for r, b in zip(rows, baseline_rows):
            print(
                f"| x{r['scale']} | {b['cpu_s']:.1f} -> {r['cpu_s']:.1f} | {b['wall_s']:.2f} -> {r['wall_s']:.2f} | "
                f"{b['cpu_s'] / r['cpu_s']:.2f}x | {b['wall_s'] / r['wall_s']:.2f}x |"
            )
    stages = list(rows[0]["timings_s"]) if rows else []
    print("\nper-stage seconds (prepare.json timings_s):")
    print("| stage | " + " | ".join(f"x{r['scale']}" for r in rows) + " |")
    print("|---|" + "---:|" * len(rows))
    for st in stages:
        print(f"| {st} | " + " | ".join(f"{r['timings_s'].get(st, float('nan')):.2f}" for r in rows) + " |")

    by = {r["scale"]: r for r in rows}
    verdict = {}
    if 10 in by and 40 in by:
        ratio = by[40]["wall_s"] / by[10]["wall_s"]
        ratio_p = by[40]["prepare_total_s"] / by[10]["prepare_total_s"]
        per_ev = {k: by[k]["wall_s"] / by[k]["events_in"] * 1e6 for k in sorted(by)}
        ratio_c = by[40]["cpu_s"] / by[10]["cpu_s"]
        print(
            f"\nlinearity: wall(x40)/wall(x10) = {ratio:.2f} (ideal 4.00); prepare total ratio {ratio_p:.2f}; "
            f"CPU ratio {ratio_c:.2f}; "
            "us/event: " + ", ".join(f"x{k} {v:.2f}" for k, v in per_ev.items())
        )
        verdict["linear (ratio <= 4.4)"] = ratio <= 4.4
    # The issue states the throughput target for GiBleed x40 (~9-10 M events); smaller scales show
    # linearity, and there the ~1 s of interpreter start-up and config in the wall time weighs more.
    top = max(rows, key=lambda r: r["scale"])
    verdict[f">= {TARGET_EPS:,} events/s at x{top['scale']} ({top['events_in']:,} events)"] = (
        top["events_per_s"] >= TARGET_EPS
    )
    short = [
        f"x{r['scale']} {r['events_per_s']:,.0f}"
        for r in rows
        if 1 < r["scale"] < top["scale"] and r["events_per_s"] < TARGET_EPS
    ]
    if short:
        print("below the target at smaller scales (start-up weighs more): " + ", ".join(short))
    verdict[f"peak RSS < {TARGET_RSS_MIB} MiB at every scale"] = all(r["peak_rss_mib"] < TARGET_RSS_MIB for r in rows)
    verdict["every patient kept"] = all(r["subjects_kept"] == r["persons_in"] for r in rows)
    if 1 in by:
        speedup = SPARK_REF["wall_s"] / by[1]["wall_s"]
        print(
            f"x1 vs quoted Spark ETL ({SPARK_REF['wall_s']:.0f} s, 1.8 GB, {SPARK_REF['subjects_kept']} of "
            f"{SPARK_REF['subjects_in']} kept): {speedup:.1f}x faster, {by[1]['peak_rss_mib']} MiB, "
            f"{by[1]['subjects_kept']} kept"
        )
        verdict[">= 10x faster than quoted Spark ETL on GiBleed x1"] = speedup >= 10
    print("\ntargets:")
    for name, ok in verdict.items():
        print(f"  [{'met' if ok else 'MISSED'}] {name}")
    print(f"\nbenchmark wall time {total_s:.0f}s")
    if args.json:
        args.json.write_text(
            json.dumps(
                {
                    "machine": machine,
                    "rows": rows,
                    "baseline": str(args.baseline) if args.baseline else None,
                    "baseline_rows": baseline_rows,
                    "verdict": verdict,
                    "total_s": total_s,
                },
                indent=2,
            )
            + "\n"
        )
    return 0


if __name__ == "__main__":
    sys.exit(main())
