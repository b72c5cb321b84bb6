"""Zero-shot prediction: sample futures after each history, read the outcome probability off them.

For each label `(subject, prediction_time)` the history cut at the prediction time
(`cehrx.data.history.cut_histories`, the cut `probe` uses: no token later than the prediction
time) is the prompt. The sampling engine (`cehrx.sampling.Engine`, settings from the `sampling:` block)
continues it `num_samples` times, prefilling each history once and sharing its cached keys with
its futures (`SharedPrefixKVCache`), with a time budget of the window's end so futures stop as
soon as they pass it.

How a future is read (outcome inside the window, resolved or not, the Monte Carlo count and the
hazard sum): `cehrx.zeroshot.score`. `zeroshot.estimator=reach` samples other futures (the outcome
forbidden inside the window, `cehrx.zeroshot.reach`) and reads REACH only off them.

Labels are processed in chunks of `chunk_size`; each finished chunk is written as
`chunks/<k>.parquet` (temporary name, then rename), so a rerun after an interruption skips the
finished chunks and the final result does not depend on where it stopped (each chunk samples
with its own seed, derived from `seed` and `k`).
"""

from __future__ import annotations

import hashlib
import json
import logging
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from cehrx.data.atomic import write_parquet
from cehrx.data.decode import decode_events, token_seconds
from cehrx.data.history import cut_histories
from cehrx.data.shards import TokenArrays, segment_cumsum
from cehrx.data.vocab import Vocab
from cehrx.data.workdir import claim_work_dir
from cehrx.errors import CehrxError
from cehrx.sampling import STOP_NAMES, Engine, Samples, SamplingConfig
from cehrx.zeroshot.controls import CV_COLUMNS, control_basis, cross_fitted, weightings
from cehrx.zeroshot.outcome import Outcome
from cehrx.zeroshot.reach import InWindow, reach_ids
from cehrx.zeroshot.score import (
    CIF_POINTS,
    DAY,
    HAZARD_COLUMNS,
    REACH_COLUMNS,
    aggregate,
    hazard_watch_ids,
    score_futures,
)

log = logging.getLogger("cehrx.zeroshot")

CHUNK_DIR = "chunks"
TRAJ_DIR = "trajectories"
MANIFEST = "manifest.json"

ESTIMATORS = ("mc", "hazard", "hazard_cv", "reach")
# estimator -> (its probability column, the column its fallback rate sums) in the chunk results
ESTIMATE_COLUMNS = {
    "mc": ("probability", "n_outcome"),
    "hazard": ("hazard_probability", "hazard_sum"),
    "hazard_cv": ("hazard_cv_probability", "hazard_cv_sum"),
    "reach": ("reach_probability", "reach_sum"),
}


def _default_sampling() -> SamplingConfig:
    return SamplingConfig(max_new_tokens=256, batch_size=1024)  # configs/task/zeroshot.yaml's defaults


@dataclass
class ZeroshotConfig:
    """The `zeroshot:` config block's run options, and how the futures are sampled (the `sampling:` block)."""

    # which estimate is the prediction: mc, hazard, hazard_cv (the hazard sum with control variates,
    # `cehrx.zeroshot.controls`; all three from the same futures), reach (futures of its own,
    # `cehrx.zeroshot.reach`), or auto = hazard when the sampling allows it, else mc
    estimator: str = "auto"
    num_samples: int = 20
    history_len: int | None = None  # default: the model's max_seq_len - sampling.max_new_tokens
    chunk_size: int = 512  # labels per resumable chunk
    write_trajectories: bool = False
    sampling: SamplingConfig = field(default_factory=_default_sampling)

    def __post_init__(self) -> None:
        if self.num_samples < 1:
            raise CehrxError(f"zeroshot.num_samples must be >= 1, got {self.num_samples}")
        if self.chunk_size < 1:
            raise CehrxError(f"zeroshot.chunk_size must be >= 1, got {self.chunk_size}")
        if self.estimator not in (*ESTIMATORS, "auto"):
            raise CehrxError(f"zeroshot.estimator must be one of {(*ESTIMATORS, 'auto')}, got {self.estimator!r}")
        if self.sampling.max_new_tokens is None:
            raise CehrxError("zero-shot needs sampling.max_new_tokens (the history gets max_seq_len - max_new_tokens)")
        s = self.sampling
        if self.estimator == "auto":  # hazard won the side-by-side benchmark; truncated sampling leaves only mc
            self.estimator = "hazard" if self.hazard_possible else "mc"
            if self.estimator == "mc":
                log.info(
                    "zeroshot.estimator=auto: mc, because the sampling is truncated (top_k=%s, top_p=%s, temperature=%s)",
                    s.top_k,
                    s.top_p,
                    s.temperature,
                )
        if self.estimator in ("hazard", "hazard_cv", "reach") and not self.hazard_possible:
            raise CehrxError(
                f"zeroshot.estimator={self.estimator} reads the distribution the futures are drawn from: it needs "
                f"sampling.temperature > 0, top_k=0 and top_p=1 (got temperature={s.temperature}, top_k={s.top_k}, "
                f"top_p={s.top_p}); zeroshot.estimator=mc works with any sampling"
            )

    @property
    def hazard_possible(self) -> bool:
        """The draws are the model's own distribution: what the hazard sum and REACH need."""
        return self.sampling.untruncated

    @property
    def controls(self) -> bool:
        """The sampler records the control expectations (`cehrx.zeroshot.controls`) beside P(outcome)."""
        return self.estimator == "hazard_cv"

    @property
    def reach(self) -> bool:
        """The futures are REACH's (the outcome forbidden inside the window), not the model's natural ones."""
        return self.estimator == "reach"

    @property
    def seed(self) -> int:
        """`sampling.seed`: the futures' seed (each chunk derives its own, `chunk_seed`), also the bootstrap's."""
        return self.sampling.seed

    @classmethod
    def from_mapping(cls, m: Any, sampling: Any) -> ZeroshotConfig:
        """From the `zeroshot:` block (keys that are not fields are the task's own, ignored here) and the
        `sampling:` block."""
        keys = {f for f in cls.__dataclass_fields__} - {"sampling"}
        return cls(**{k: v for k, v in dict(m).items() if k in keys}, sampling=SamplingConfig.from_mapping(sampling))

    def history_max_len(self, max_seq_len: int) -> int:
        """Tokens of history a prompt may keep so that history + future fit the model's context."""
        max_new = int(self.sampling.max_new_tokens)
        room = max_seq_len - max_new
        n = room if self.history_len is None else min(int(self.history_len), room)
        if n < 16:
            raise CehrxError(
                f"sampling.max_new_tokens={max_new} leaves {room} of the model's {max_seq_len} positions for the "
                "history: lower max_new_tokens"
            )
        return n


def zeroshot_engine(model: Any, vocab: Vocab, zcfg: ZeroshotConfig, outcome: Outcome) -> Engine:
    """The engine that samples the futures; it records P(outcome) per step when the hazard estimate is possible,
    and for REACH also forbids the outcome tokens where `predict_chunk` says (refusing outcomes it cannot forbid)."""
    if zcfg.reach:
        ids = reach_ids(outcome)
        return Engine(model, vocab, zcfg.sampling, watch_ids=ids, forbid_ids=ids)
    watch = hazard_watch_ids(outcome) if zcfg.hazard_possible else None
    basis = control_basis(vocab, model.wte.weight, watch) if zcfg.controls else None
    return Engine(model, vocab, zcfg.sampling, watch_ids=watch, control_basis=basis)


def config_dict(zcfg: ZeroshotConfig) -> dict[str, Any]:
    """The `zeroshot:` options of the run (`metrics.json`), without the sampling settings."""
    d = asdict(zcfg)
    d.pop("sampling")
    return d


def sampling_dict(zcfg: ZeroshotConfig) -> dict[str, Any]:
    """The `sampling:` settings of the run (`metrics.json`); `max_days` is each chunk's own (the window's end)."""
    d = zcfg.sampling.to_dict()
    d.pop("max_days")
    return d


def run_settings(zcfg: ZeroshotConfig) -> dict[str, Any]:
    """Every option that decides the futures, in one flat dict: what the chunks' `fingerprint` hashes.
    Flat as before the `sampling:` block existed, so chunks of earlier runs still resume."""
    return {**config_dict(zcfg), **sampling_dict(zcfg)}


# ---------------------------------------------------------------------------- chunked runner


@dataclass
class LabelInputs:
    """The labels to predict, as arrays (row i = label i)."""

    subject_id: np.ndarray  # int64
    prediction_time: np.ndarray  # int64 seconds
    boolean_value: np.ndarray  # bool
    weight: np.ndarray | None = None  # float64: inverse sampling probability (case-control samples), else None


def fingerprint(parts: dict[str, Any], labels: LabelInputs) -> str:
    """Hash of everything that determines the chunk results, so a resume never mixes two runs."""
    h = hashlib.sha256(json.dumps(parts, sort_keys=True, default=str).encode())
    for a in (labels.subject_id, labels.prediction_time):
        h.update(np.ascontiguousarray(a, dtype=np.int64).tobytes())
    return h.hexdigest()[:16]


def claim_chunks(work: Path, fp: str, overwrite: bool) -> int:
    """Make `work/chunks` the chunk dir of run `fp`; returns how many finished chunks it already holds.

    Chunks of a different run (model, labels, outcome or settings changed: `manifest.json` holds the
    fingerprint) are refused unless `overwrite`, which starts them over; chunks of the same run are resumed,
    also under `overwrite` (`claim_work_dir`).
    """
    chunks = work / CHUNK_DIR
    claim_work_dir(chunks, {"fingerprint": fp}, overwrite, what="zero-shot", settings_file=MANIFEST)
    return len(list(chunks.glob("*.parquet")))


def run_chunks(
    engine: Engine,
    arrays: TokenArrays,
    labels: LabelInputs,
    outcome: Outcome,
    zcfg: ZeroshotConfig,
    work: Path,
    progress: bool = True,
) -> pa.Table:
    """Predict every label chunk by chunk (skipping finished chunks); returns all chunk rows."""
    n = len(labels.subject_id)
    n_chunks = (n + zcfg.chunk_size - 1) // zcfg.chunk_size
    bar = _bar(progress and n_chunks > 1, n)  # one chunk: the sampler's own bar shows progress
    max_len = zcfg.history_max_len(engine.max_seq_len)
    done = 0
    try:
        for k in range(n_chunks):
            path = work / CHUNK_DIR / f"{k}.parquet"
            rows = np.arange(k * zcfg.chunk_size, min((k + 1) * zcfg.chunk_size, n))
            if path.is_file():
                done += 1
            else:
                table, traj = predict_chunk(
                    engine, arrays, labels, rows, outcome, zcfg, max_len, k, progress and n_chunks == 1
                )
                if traj is not None:
                    write_parquet(traj, work / CHUNK_DIR / TRAJ_DIR / f"{k}.parquet")
                write_parquet(table, path)
            if bar is not None:
                bar.update(len(rows))
    finally:
        if bar is not None:
            bar.close()
    if done:
        log.info("resumed: %d of %d chunks were already done", done, n_chunks)
    tables = [pq.read_table(work / CHUNK_DIR / f"{k}.parquet") for k in range(n_chunks)]
    results = pa.concat_tables(tables) if tables else _empty_chunk()
    if CV_COLUMNS[0] in results.column_names:  # fitted over every chunk's labels, so after the last one
        for name, values in cross_fitted(results).items():
            results = results.append_column(name, pa.array(values))
    return results


def predict_chunk(
    engine: Engine,
    arrays: TokenArrays,
    labels: LabelInputs,
    rows: np.ndarray,
    outcome: Outcome,
    zcfg: ZeroshotConfig,
    max_len: int,
    chunk: int,
    progress: bool = False,
) -> tuple[pa.Table, pa.Table | None]:
    """Histories -> futures -> per-label counts for label rows `rows` (+ MEDS trajectories if asked)."""
    vocab = engine.vocab
    hist = cut_histories(arrays, vocab, labels.subject_id[rows], labels.prediction_time[rows], max_len)
    kept = rows[hist.label_index]
    slack = np.maximum(labels.prediction_time[kept] - hist.last_time, 0)
    w = outcome.window
    max_days = None if np.isinf(w.end_days) else float(w.end_days + (slack.max() / DAY if len(slack) else 0.0))
    n_controls = 0 if engine.control is None else engine.control.shape[1] * weightings(outcome.window)
    cols = _chunk_columns(len(rows), zcfg, outcome, n_controls)
    traj = None
    if len(kept):
        inside = InWindow(w, slack, zcfg.num_samples, engine.device) if zcfg.reach else None
        s = engine.with_settings(max_days=max_days, seed=chunk_seed(zcfg.seed, chunk)).sample(
            hist.tokens, hist.offsets, num_samples=zcfg.num_samples, progress=progress, forbid_when=inside
        )
        scores = score_futures(
            vocab,
            outcome,
            s.tokens,
            s.offsets,
            s.stop,
            slack[s.prompt_index],
            s.watch_prob,
            reach=zcfg.reach,
            control_mean=s.control_mean,
            control_basis=None if engine.control is None else engine.control.cpu().numpy(),
        )
        _fill_columns(cols, hist.label_index, aggregate(scores, s.prompt_index, len(kept)), s)
        cols["history_len"][hist.label_index] = hist.lengths()
        if zcfg.write_trajectories:
            traj = trajectories(vocab, s, labels, kept, hist.last_time, zcfg.num_samples, zcfg.seed + chunk)
    has_history = np.zeros(len(rows), dtype=bool)
    has_history[hist.label_index] = True
    table = pa.table(
        {
            "label_row": pa.array(rows.astype(np.int64)),
            "has_history": pa.array(has_history),
            **{c: pa.array(list(v), pa.list_(pa.float64())) if v.ndim == 2 else pa.array(v) for c, v in cols.items()},
        }
    )
    return table, traj


def _chunk_columns(n: int, zcfg: ZeroshotConfig, outcome: Outcome, n_controls: int = 0) -> dict[str, np.ndarray]:
    """A chunk's per-label columns, in their order, before any label is scored (labels without a history keep them).
    A REACH run's futures are not the model's natural ones: its chunks hold REACH only (no Monte Carlo count).
    With `n_controls` the control variates' per-label sums (`controls.CV_COLUMNS`)."""
    finite = np.isfinite(outcome.window.end_days)
    cols = {c: np.zeros(n, dtype=np.int64) for c in ("history_len", "n_futures", "n_resolved")}
    if zcfg.reach:
        cols.update({c: np.full(n, np.nan) for c in REACH_COLUMNS})
        if finite:
            cols["reach_cif"] = np.full((n, CIF_POINTS), np.nan)
    else:
        cols["n_outcome"] = np.zeros(n, dtype=np.int64)
        cols.update({c: np.full(n, np.nan) for c in ("probability", "expected_days")})
        if zcfg.hazard_possible:
            cols.update({c: np.full(n, np.nan) for c in HAZARD_COLUMNS})
            if finite:
                cols["hazard_cif"] = np.full((n, CIF_POINTS), np.nan)
        if n_controls:
            k = n_controls
            widths = {"cv_m_all": k, "cv_m": k, "cv_mm": k * k, "cv_mh": k, "cv_hh": 0}
            cols.update({c: np.zeros((n, w)) if w else np.zeros(n) for c, w in widths.items()})
    cols.update({f"stop_{name}": np.zeros(n, dtype=np.int64) for name in STOP_NAMES})
    return cols


def _fill_columns(cols: dict[str, np.ndarray], local: np.ndarray, agg: dict[str, np.ndarray], s: Samples) -> None:
    """The scored labels' values (`local`: their rows in the chunk): aggregates and stop reasons."""
    for c, arr in cols.items():
        if c in agg:
            arr[local] = agg[c]
    for i, name in enumerate(STOP_NAMES):
        cols[f"stop_{name}"][local] = np.bincount(s.prompt_index, weights=s.stop == i, minlength=len(local))


def chunk_seed(seed: int, chunk: int) -> int:
    return int(seed) * 100_003 + int(chunk)


def trajectories(
    vocab: Vocab, s: Any, labels: LabelInputs, kept: np.ndarray, last_time: np.ndarray, num_samples: int, seed: int
) -> pa.Table:
    """The sampled futures as MEDS rows (+ `prediction_time`, `sample`), times rebuilt from time tokens."""
    offsets = np.asarray(s.offsets, dtype=np.int64)
    steps = token_seconds(vocab)[np.asarray(s.tokens, dtype=np.int64)]
    seg = np.repeat(np.arange(len(offsets) - 1), np.diff(offsets))
    times = last_time[s.prompt_index][seg] + segment_cumsum(steps, offsets)
    rows = decode_events(vocab, np.arange(len(offsets) - 1), offsets, s.tokens, times, seed=seed)
    r = rows.column("subject_id").to_numpy()
    label = kept[s.prompt_index[r]]
    return pa.table(
        {
            "subject_id": pa.array(labels.subject_id[label]),
            "prediction_time": pa.array(labels.prediction_time[label].astype("datetime64[s]").astype("datetime64[us]")),
            "sample": pa.array((r % num_samples).astype(np.int32)),
            "time": rows.column("time"),
            "code": rows.column("code"),
            "numeric_value": rows.column("numeric_value"),
        }
    )


def write_trajectories(work: Path, out_dir: Path, num_samples: int) -> list[Path]:
    """Gather chunk trajectories into `out_dir/<j>.parquet`, one MEDS file per sample index j."""
    from cehrx.data.duck import connect, literal

    src = work / CHUNK_DIR / TRAJ_DIR
    files = sorted(src.glob("*.parquet"))
    out_dir.mkdir(parents=True, exist_ok=True)
    if not files:
        return []
    con = connect()
    paths = []
    try:
        glob = literal(str(src / "*.parquet"))
        for j in range(num_samples):
            p = out_dir / f"{j}.parquet"
            con.execute(f"""COPY (SELECT subject_id, prediction_time, time, code, numeric_value FROM read_parquet({glob})
                            WHERE sample = {int(j)} ORDER BY subject_id, prediction_time, time NULLS FIRST) TO {literal(str(p))} (FORMAT parquet)""")
            paths.append(p)
    finally:
        con.close()
    return paths


def _empty_chunk() -> pa.Table:
    return pa.table({"label_row": pa.array([], pa.int64())})


def _bar(enabled: bool, total: int):
    if not enabled:
        return None
    from tqdm.auto import tqdm

    return tqdm(total=total, unit="label", desc="zero-shot", dynamic_ncols=True)


def finalize_probabilities(results: pa.Table, estimator: str = "mc") -> tuple[np.ndarray, np.ndarray, float]:
    """Probabilities of `estimator` with the documented fallback for labels whose futures were all unresolved.

    Returns (probability, fallback flag, fallback value = the estimate over all resolved futures of the run).
    """
    column, total = ESTIMATE_COLUMNS[estimator]
    if column not in results.column_names:
        raise CehrxError(
            f"zero-shot results hold no {estimator} estimates (hazard needs temperature > 0, top_k=0, top_p=1; "
            "a zeroshot.estimator=reach run holds reach only, and only such a run holds it)"
        )
    prob = results.column(column).to_numpy(zero_copy_only=False).astype(np.float64)
    res = results.column("n_resolved").to_numpy()
    pos = results.column(total).to_numpy(zero_copy_only=False).astype(np.float64)
    rate = float(np.nansum(pos) / res.sum()) if res.sum() else 0.0
    fb = ~np.isfinite(prob)
    return np.where(fb, rate, prob), fb, rate
