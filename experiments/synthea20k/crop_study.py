"""Tables of the crop-sampling study (`run_crop_study.sh`): validation loss, zero-shot calibration and
generated deaths for the model continued with each crop sampling, beside the unchanged model.

    python experiments/synthea20k/crop_study.py [--out runs/cropstudy] [--root runs/synthea20k]
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq

ARMS = ("base", "visits", "tokens", "tokens_after_death")
TASKS = ("synthea20k_death_1y", "synthea20k_inpatient_1y")


def load(path: Path) -> dict:
    return json.loads(path.read_text()) if path.is_file() else {}


def weighted_means(details: Path) -> tuple[float, float]:
    """(mean predicted risk, observed rate), both weighted back to the whole held-out split."""
    t = pq.read_table(details)
    w = t.column("weight").to_numpy() if "weight" in t.column_names else np.ones(t.num_rows)
    p, y = t.column("probability").to_numpy(), t.column("boolean_value").to_numpy().astype(float)
    return float(np.average(p, weights=w)), float(np.average(y, weights=w))


def crop_coverage(root: Path) -> str:
    """[DEATH] per million trained tokens under each sampling, one epoch of the train split, against the data."""
    from cehrx.data.packing import make_samples
    from cehrx.data.shards import PROMPT_LEN, TokenArrays
    from cehrx.data.vocab import DEATH, Vocab

    cache = root / "prepared" / "cache" / "train"
    arrays = TokenArrays.load_npy(cache)
    visit_starts = np.load(cache / "visit_starts.npy", mmap_mode="r")
    vocab = Vocab.load(root / "prepared")
    tokens, off = np.asarray(arrays.tokens), arrays.offsets.astype(np.int64)
    length = arrays.lengths().astype(np.int64)
    long = length + 1 > 1024
    pos = np.flatnonzero(tokens == vocab[DEATH])
    subj = np.searchsorted(off, pos, side="right") - 1
    rel = pos - off[subj]
    body = length - PROMPT_LEN
    rows = [
        "| crops | trained tokens per epoch | [DEATH] per 1 M trained tokens: all records | long records (> 1,024 tokens) | long-record crops ending the record |",
        "|---|---:|---:|---:|---:|",
        f"| the data itself | {int(body.sum()):,} | {len(pos) / body.sum() * 1e6:.1f} | {long[subj].sum() / body[long].sum() * 1e6:.1f} | - |",
    ]
    for mode in ("visits", "tokens"):
        s = make_samples(arrays, visit_starts, vocab, 1024, np.random.default_rng([42, 0]), mode)
        inside = (rel >= s.start[subj]) & (rel < s.start[subj] + s.n_body[subj])
        trained = s.n_body + s.end
        rows.append(
            f"| `crop_sampling={mode}` | {int(trained.sum()):,} | {inside.sum() / trained.sum() * 1e6:.1f} | "
            f"{inside[long[subj]].sum() / trained[long].sum() * 1e6:.1f} | {s.end[long].mean():.1%} |"
        )
    return "\n".join(rows)


def paired_table(out: Path) -> str:
    """tokens - visits on the same labels (same seed, same case-control sample): paired subject bootstrap."""
    from cehrx.eval.metrics import paired_difference

    rows = ["| task | tokens - visits AUROC [95% CI] | tokens - visits AUPRC [95% CI] |", "|---|---:|---:|"]
    for task in TASKS:
        a, b = out / "zs" / "tokens" / task / "details.parquet", out / "zs" / "visits" / task / "details.parquet"
        if not (a.is_file() and b.is_file()):
            continue
        ta, tb = pq.read_table(a), pq.read_table(b)
        key = ["subject_id", "prediction_time"]
        assert ta.select(key).equals(tb.select(key)), "the two runs must score the same labels"
        w = ta.column("weight").to_numpy() if "weight" in ta.column_names else None
        d = paired_difference(
            ta.column("boolean_value").to_numpy(),
            ta.column("subject_id").to_numpy(),
            ta.column("probability").to_numpy(),
            [tb.column("probability").to_numpy()],
            n_boot=1000,
            sample_weight=w,
        )
        cell = lambda m: f"{d[m]['value']:+.3f} [{d[m]['ci_low']:+.3f}, {d[m]['ci_high']:+.3f}]"  # noqa: E731
        rows.append(f"| {task.removeprefix('synthea20k_')} | {cell('auroc')} | {cell('auprc')} |")
    return "\n".join(rows)


def record_shape(meds_glob: str, data_end: str) -> tuple:
    """(patients, died, alive but ended > 1 year before the data's end, median years recorded, median age at
    the last event, median events) of a MEDS data glob: where and how records end."""
    import duckdb

    return duckdb.sql(
        f"""
        with s as (
          select subject_id, max(time) as last_t, min(time) filter (where code <> 'MEDS_BIRTH') as first_t,
                 min(time) filter (where code = 'MEDS_BIRTH') as birth, bool_or(code = 'MEDS_DEATH') as died,
                 count(*) as n
          from read_parquet('{meds_glob}') group by subject_id)
        select count(*), avg(died::int),
               avg(case when not died and last_t < timestamp '{data_end}' - interval 365 day then 1 else 0 end),
               median(date_diff('day', first_t, last_t) / 365.25), median(date_diff('day', birth, last_t) / 365.25),
               median(n)
        from s"""
    ).fetchall()[0]


def shape_table(out: Path, real: str) -> str:
    rows = [
        "| records | patients | died | alive, ended > 1 y before the data's end | median years recorded | median age at last event | median events |",
        "|---|---:|---:|---:|---:|---:|---:|",
    ]
    end = None
    for arm in ARMS:
        g = load(out / "gen" / arm / "generate.json")
        if g:
            end = str(np.datetime64(int(g["settings"]["end_time"]), "s")).replace("T", " ")
    if end is None:
        return ""
    sets = [("real train", f"{real}/data/train/*.parquet")]
    sets += [(f"generated: {arm}", str(out / "gen" / arm / "meds" / "data" / "*" / "*.parquet")) for arm in ARMS]
    for name, glob in sets:
        if name != "real train" and not load(out / "gen" / name.split(": ")[1] / "generate.json"):
            continue
        n, died, gone, years, age, events = record_shape(glob, end)
        rows.append(f"| {name} | {n:,} | {died:.1%} | {gone:.1%} | {years:.1f} | {age:.1f} | {events:,.0f} |")
    return "\n".join(rows)


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--out", default="runs/cropstudy")
    ap.add_argument("--root", default="runs/synthea20k")
    ap.add_argument("--no-coverage", action="store_true")
    ap.add_argument("--real", default="../shared/data/synthea20k/meds", help="the real MEDS dataset")
    a = ap.parse_args()
    out, root = Path(a.out), Path(a.root)
    if not a.no_coverage:
        print(crop_coverage(root), end="\n\n")
    model = {arm: (root / "model" if arm == "base" else out / arm) for arm in ARMS}
    print("| model | steps | val loss (tuning, end-of-record windows) | val ppl |")
    print("|---|---:|---:|---:|")
    for arm in ARMS:
        m = load(model[arm] / "metrics.json")
        if m:
            print(f"| {arm} | {m.get('global_step')} | {m['val/loss']:.4f} | {m['val/ppl']:.3f} |")
    print()
    print(
        "| task | model | AUROC hazard | AUROC MC | Brier | ECE | mean predicted risk | observed rate | futures ending in [DEATH] |"
    )
    print("|---|---|---:|---:|---:|---:|---:|---:|---:|")
    for task in TASKS:
        for arm in ARMS:
            d = out / "zs" / arm / task
            m = load(d / "metrics.json")
            if not m:
                continue
            pred, obs = weighted_means(d / "details.parquet")
            mc = m.get("estimators", {}).get("mc", {}).get("auroc", {}).get("value", float("nan"))
            f = m["futures"]
            print(
                f"| {task.removeprefix('synthea20k_')} | {arm} | {m['auroc']['value']:.3f} [{m['auroc']['ci_low']:.3f}, {m['auroc']['ci_high']:.3f}] | {mc:.3f} | "
                f"{m['brier']['value']:.4f} | {m['ece']['value']:.4f} | {pred:.4f} | {obs:.4f} | {f['stops'].get('death', 0) / f['futures']:.2%} |"
            )
    print()
    print(paired_table(out))
    print()
    print(
        "| model | patients | samples | stop [DEATH] | stop [END] | at the data's end | tokens per patient | copies of train dropped | tokens/s |"
    )
    print("|---|---:|---:|---:|---:|---:|---:|---:|---:|")
    for arm in ARMS:
        g = load(out / "gen" / arm / "generate.json")
        if not g:
            continue
        st, pt, tk = g["stop"], g["patients"], g["tokens"]
        n = sum(st.values())
        print(
            f"| {arm} | {pt['valid']} | {pt['samples']} | {st['death'] / n:.1%} | {st['end'] / n:.1%} | {st['tokens'] / n:.1%} | "
            f"{tk['mean_per_sample']:.0f} | {pt['dropped'].get('copy_of_train', 0)} | {tk['per_second']:.0f} |"
        )

    print()
    print(shape_table(out, a.real))


if __name__ == "__main__":
    main()
