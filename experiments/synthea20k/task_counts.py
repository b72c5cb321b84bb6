"""Labels, positives and positive subjects of the shipped ACES tasks, per split.

    python experiments/synthea20k/task_counts.py                                  # every synthea20k_* task, all splits
    python experiments/synthea20k/task_counts.py --splits held_out --tasks synthea20k_t2d_3y

Labels come from `cehrx.probe.labels.extract_labels` (ACES plus the task's `cehrx_followup_days`), run on
each split's MEDS files separately (so the follow-up cutoff is that split's last event, within hours of the
whole set's); these are ACES labels, before probe drops any label without a history.
"""

from __future__ import annotations

import argparse
import json
import logging
import time
from pathlib import Path

import pyarrow.compute as pc

from cehrx.probe.labels import available_tasks, extract_labels

SOURCE = Path(__file__).resolve().parents[2] / ".." / "shared" / "data" / "synthea20k" / "meds"


def count(task: str, meds: Path, split: str) -> dict:
    t0 = time.perf_counter()
    labels = extract_labels(task, meds / "data" / split)
    y = labels.column("boolean_value")
    pos = labels.filter(y)
    return {
        "task": task,
        "split": split,
        "labels": len(labels),
        "positives": int(pc.sum(y).as_py() or 0),
        "subjects": len(pc.unique(labels.column("subject_id"))),
        "positive_subjects": len(pc.unique(pos.column("subject_id"))),
        "seconds": round(time.perf_counter() - t0, 1),
    }


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--meds", type=Path, default=SOURCE.resolve())
    ap.add_argument("--splits", nargs="+", default=["train", "tuning", "held_out"])
    ap.add_argument("--tasks", nargs="+", default=[t for t in available_tasks() if t.startswith("synthea20k_")])
    ap.add_argument("--json", type=Path, default=None, help="also write the rows here")
    args = ap.parse_args()
    logging.basicConfig(level=logging.WARNING)
    rows = []
    print(
        "| task | split | labels | positives | subjects | positive subjects | s |\n|---|---|---:|---:|---:|---:|---:|"
    )
    for task in args.tasks:
        for split in args.splits:
            r = count(task, args.meds, split)
            rows.append(r)
            print(
                f"| {task} | {split} | {r['labels']:,} | {r['positives']:,} | {r['subjects']:,} | {r['positive_subjects']:,} | {r['seconds']} |",
                flush=True,
            )
    if args.json:
        args.json.write_text(json.dumps(rows, indent=1))


if __name__ == "__main__":
    main()
