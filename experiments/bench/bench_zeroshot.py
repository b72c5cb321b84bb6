"""Zero-shot sampling throughput: patients/s at 20 futures x up to 256 new tokens, CPU, `tiny`.

Compares the way `task=zeroshot` samples (many patients' histories batched together, each
history prefilled once and its cached keys shared by its futures, `batch_size` rows per
forward, finished rows replaced by new patients' futures) with running the same engine one patient at a time (one history, its 20 futures in
one batch of 20), and, as the naive reference, one future at a time (batch of 1). Histories are the real zero-shot prompts: GiBleed `gibleed_after_nsaid`
labels of the held_out split, cut at their prediction times to `max_seq_len - max_new_tokens`.

Two workloads:
- `fixed`: every future runs its full token budget (no stop tokens, no time budget), so both
  modes do exactly the same work and the ratio is the batching speed-up alone.
- `zeroshot`: the task's own stops ([END]/[DEATH], the 365-day window as time budget), the
  work a real run does (needs a trained model for meaningful stop rates).

    python experiments/bench/bench_zeroshot.py --prepared /tmp/zs/gibleed --model-dir runs/eunomia/model
    python experiments/bench/bench_zeroshot.py --prepared runs/gibleed            # random-init tiny
    python experiments/bench/bench_zeroshot.py --prepared ... --model-dir ... --patients 261 --serial-patients 261 --device cuda

Prints a markdown table and writes JSON (--out). On a shared machine run with `--threads 1` and
read the CPU-seconds columns (`time.process_time`): wall time there measures the other tenants.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import time
from pathlib import Path

import numpy as np
import torch

from cehrx.data.history import cut_histories, load_all_splits
from cehrx.data.vocab import Vocab
from cehrx.sampling import Engine, SamplingConfig


def histories(prepared: Path, vocab: Vocab, task: str, max_len: int, split: str = "held_out"):
    """The zero-shot prompts of a task: its labels' histories, longest-first order kept as extracted."""
    from cehrx.probe.labels import extract_labels, meds_dir_for, times_seconds

    labels = extract_labels(task, meds_dir_for(prepared))
    arrays, split_of = load_all_splits(prepared)
    keep = np.isin(labels.column("subject_id").to_numpy(), arrays.subject_id[split_of == split])
    sid = labels.column("subject_id").to_numpy()[keep]
    t = times_seconds(labels.column("prediction_time"))[keep]
    return cut_histories(arrays, vocab, sid, t, max_len)


def subset(h, idx: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    parts = [h.tokens[h.offsets[i] : h.offsets[i + 1]] for i in idx]
    return np.concatenate(parts), np.concatenate([[0], np.cumsum([len(p) for p in parts])]).astype(np.int64)


def load_model(args: argparse.Namespace, vocab: Vocab):
    if args.model_dir:
        from cehrx.model.export import load_pretrained

        model, mvocab = load_pretrained(args.model_dir)
        if mvocab.tokens != vocab.tokens:
            raise SystemExit(f"{args.model_dir} was trained on another vocabulary than {args.prepared}")
        return model, "trained " + str(args.model_dir)
    from cehrx.model.config import GPTConfig
    from cehrx.model.transformer import GPT

    torch.manual_seed(0)
    cfg = GPTConfig(name="tiny", vocab_size=len(vocab), n_layer=4, n_embd=128, n_head=4, max_seq_len=512)
    return GPT(cfg).eval(), "random-init tiny"


MODES = {"batched": "batched", "patient": "one patient at a time", "future": "one future at a time"}


def run_mode(model, vocab, h, idx: np.ndarray, args: argparse.Namespace, mode: str, workload: str) -> dict:
    """`batched`: all patients in one call; `patient`: one call per patient (its futures batched);
    `future`: one call per future (no batching, no KV replication: the naive reference)."""
    size = {"batched": args.batch_size, "patient": args.num_samples, "future": 1}[mode]
    stop_ids = None if workload == "zeroshot" else ()
    max_days = 365.0 if workload == "zeroshot" else None
    start, cpu0 = time.perf_counter(), time.process_time()
    n_tokens = 0
    # global prompt ids (and, one future at a time, future ids) give every future the same random
    # numbers in every mode: the three modes sample exactly the same futures, so do the same work
    groups = [np.arange(len(idx))] if mode == "batched" else [np.array([i]) for i in range(len(idx))]
    reps = args.num_samples if mode == "future" else 1
    scfg = SamplingConfig(max_new_tokens=args.max_new_tokens, batch_size=size, max_days=max_days, seed=0)
    engine = Engine(model, vocab, scfg, stop_ids=stop_ids)
    for g in groups:
        toks, offs = subset(h, idx[g])
        for r in range(reps):
            ids = g * args.num_samples + r if mode == "future" else g
            s = engine.sample(toks, offs, num_samples=args.num_samples // reps, progress=False, prompt_ids=ids)
            n_tokens += len(s.tokens)
    sec, cpu = time.perf_counter() - start, time.process_time() - cpu0
    return {
        "mode": MODES[mode],
        "workload": workload,
        "patients": len(idx),
        "seconds": round(sec, 2),
        "cpu_seconds": round(cpu, 2),
        "patients_per_s": round(len(idx) / sec, 3),
        "patients_per_cpu_s": round(len(idx) / cpu, 3),
        "new_tokens_per_s": round(n_tokens / sec, 1),
        "mean_new_tokens": round(n_tokens / len(idx) / args.num_samples, 1),
    }


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument(
        "--prepared",
        type=Path,
        default=Path("runs/gibleed"),
        help="prepared GiBleed dir (default: `cehrx task=prepare data=gibleed`'s)",
    )
    ap.add_argument("--model-dir", type=Path, default=None, help="trained tiny model (default: random-init tiny)")
    ap.add_argument("--task", default="gibleed_after_nsaid")
    ap.add_argument("--patients", type=int, default=64, help="patients in the batched run")
    ap.add_argument(
        "--serial-patients", type=int, default=8, help="patients in the one-patient-at-a-time run (same first ones)"
    )
    ap.add_argument(
        "--single-patients", type=int, default=1, help="patients in the one-future-at-a-time run (0 = skip)"
    )
    ap.add_argument("--num-samples", type=int, default=20)
    ap.add_argument("--max-new-tokens", type=int, default=256)
    ap.add_argument(
        "--batch-size", type=int, default=1024, help="rows per forward in the batched run (task=zeroshot's default)"
    )
    ap.add_argument("--workloads", default="fixed,zeroshot")
    ap.add_argument("--threads", type=int, default=None)
    ap.add_argument(
        "--device",
        default="cpu",
        choices=["cpu", "cuda"],
        help="where the model runs (cuda: the ratio the issue expects to be large)",
    )
    ap.add_argument("--out", type=Path, default=None)
    args = ap.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    if not (args.prepared / "vocab.json").is_file():
        raise SystemExit(
            f"no prepared dir at {args.prepared}: run `cehrx task=prepare data=gibleed` (or pass --prepared)"
        )
    vocab = Vocab.load(args.prepared)
    if args.device == "cuda" and not torch.cuda.is_available():
        raise SystemExit("--device cuda: no CUDA device visible")
    model, what = load_model(args, vocab)
    model = model.to(args.device)
    h = histories(args.prepared, vocab, args.task, model.config.max_seq_len - args.max_new_tokens)
    rng = np.random.default_rng(0)
    idx = np.sort(rng.choice(len(h), min(args.patients, len(h)), replace=False))
    rows = []
    for workload in args.workloads.split(","):
        ref = []
        if args.single_patients:
            ref.append(run_mode(model, vocab, h, idx[: args.single_patients], args, "future", workload))
        serial = run_mode(model, vocab, h, idx[: args.serial_patients], args, "patient", workload)
        batched = run_mode(model, vocab, h, idx, args, "batched", workload)
        for r in (*ref, serial):  # speed-up of the batched run over each slower mode
            r["speedup"] = round(batched["patients_per_s"] / r["patients_per_s"], 2)
            r["speedup_cpu"] = round(batched["patients_per_cpu_s"] / r["patients_per_cpu_s"], 2)
        rows += [*ref, serial, batched]
    info = {
        "model": what,
        "prepared": str(args.prepared),
        "task": args.task,
        "num_samples": args.num_samples,
        "max_new_tokens": args.max_new_tokens,
        "batch_size": args.batch_size,
        "history_tokens_mean": round(float(h.lengths()[idx].mean()), 1),
        "torch_threads": torch.get_num_threads(),
        "cpu": platform.processor() or platform.machine(),
        "device": torch.cuda.get_device_name() if args.device == "cuda" else "cpu",
        "cores": os.cpu_count(),
        "torch": torch.__version__,
        "load_avg": os.getloadavg(),
    }
    print(
        f"model: {what}; {info['num_samples']} futures x <= {info['max_new_tokens']} new tokens; batch_size {info['batch_size']}; "
        f"mean history {info['history_tokens_mean']} tokens; torch threads {info['torch_threads']}; device {info['device']}; load avg {info['load_avg']}"
    )
    print(
        "| workload | mode | patients | wall s | CPU s | patients/s | patients/CPU-s | new tokens/s | mean new tokens / future | batched is x faster (wall / CPU) |"
    )
    print("|---|---|---:|---:|---:|---:|---:|---:|---:|---:|")
    for r in rows:
        up = f"{r['speedup']} / {r['speedup_cpu']}" if "speedup" in r else ""
        print(
            f"| {r['workload']} | {r['mode']} | {r['patients']} | {r['seconds']} | {r['cpu_seconds']} | {r['patients_per_s']} | {r['patients_per_cpu_s']} | "
            f"{r['new_tokens_per_s']} | {r['mean_new_tokens']} | {up} |"
        )
    if args.out:
        args.out.write_text(json.dumps({"info": info, "rows": rows}, indent=2) + "\n")


if __name__ == "__main__":
    main()
