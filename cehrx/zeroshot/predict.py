"""Zero-shot prediction: sample futures after each history, read the outcome probability off them.

For each label `(subject, prediction_time)` the history cut at the prediction time
(`cehrx.data.history.cut_histories`, the cut `probe` uses: no token later than the prediction
time) is the prompt. The shared engine (`cehrx.generate.sampler.sample`) continues it
`num_samples` times, prefilling each history once and sharing its cached keys with its futures (`SharedPrefixKVCache`),
with a time budget of the window's end so futures stop as soon as they pass it.

Reading a future (`score_futures`, vectorised over all tokens of all futures):

- **Time.** A generated token's time is the last history time plus the time tokens generated up
  to and including it (gap `D<n>`/`Y<n>`, inpatient `i-D<n>`/`i-H<h>`). Its offset from the
  prediction time is that minus the prediction time, floored at 0: everything generated comes
  after the cut, so an event whose rebuilt time is not later than the prediction time (the model
  cannot know how long ago the last recorded event was) happens just after it.
- **Inside the window.** An outcome token (see `cehrx.zeroshot.outcome`) counts when its offset
  is inside `(start, end]` (inclusivity from the ACES window) and, with `window_visits=N`, it
  comes before the (N+1)-th generated `[VS]`.
- **Who is in the denominator.** A future is *resolved* when it has the outcome inside the
  window, when it has run past the window's end (time, or visit count) without it, or when it
  ended with `[END]`/`[DEATH]` (the record ends: a true negative). A future cut by the token
  budget before the window's end without the outcome is *unresolved* and left out: it says
  nothing about the rest of the window.
- **Probability** = futures with the outcome / resolved futures. When all of a label's futures
  are unresolved, the label gets the mean probability over all resolved futures of the run (the
  model could not tell, so it gets the cohort rate; `fallback=True` in `details.parquet`).
- **Expected time to outcome** = mean days from the prediction time to the first outcome token,
  over the futures that have one in the window (NaN when none does).

**The hazard estimator** (`zeroshot.estimator=hazard`) reads the same futures differently. At
every step t the sampler also records p_t, the probability that the token it draws is an outcome
token (`sample(watch_ids=...)`). Let H_t = 1 when no outcome has been drawn inside the window
before step t, and w_t = 1 when an outcome drawn at step t would fall inside the window (its
time and visit count are those of the tokens before it, as outcome codes carry no time). Then

    P(outcome in window) = E[ sum_t H_t w_t 1{x_t outcome} ] = E[ sum_t H_t w_t p_t ]

because the indicator's expectation given the past is p_t and H_t, w_t depend on the past only
(the tower rule; the sum has at most one non-zero indicator, at the first outcome). So each
future's `sum_t H_t w_t p_t` (steps up to and including its first outcome) is an unbiased
estimate of the label's risk, like its 0/1 indicator, but it spends the probability of every
step instead of one draw: for a rare outcome most futures contribute a small positive number
rather than 0, and the variance drops by orders of magnitude. The futures are the same
(recording p_t changes no draw). Assumptions: the distribution the futures are drawn from is the
model's (temperature applied, no top-k/top-p truncation: refused); resolution and the fallback
are those of the Monte Carlo count. An outcome code that needs a value (`allowed_q`) cannot be
priced before its value is drawn: its term stays the realised indicator, which keeps the sum
unbiased. The per-label standard error is the spread of the per-future sums over sqrt(resolved).
From the same terms: the expected days to the outcome (the terms weighting their times) and a
cumulative incidence curve (the terms summed up to each of `CIF_POINTS` times in the window).

Labels are processed in chunks of `chunk_size`; each finished chunk is written as
`chunks/<k>.parquet` (temporary name, then rename), so a rerun after an interruption skips the
finished chunks and the final result does not depend on where it stopped (each chunk samples
with its own seed, derived from `seed` and `k`).
"""

from __future__ import annotations

import hashlib
import json
import logging
import shutil
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from cehrx.data.atomic import write_parquet, write_text
from cehrx.data.decode import decode_events, token_seconds
from cehrx.data.history import cut_histories
from cehrx.data.shards import TokenArrays
from cehrx.data.vocab import VS, Vocab
from cehrx.errors import CehrxError
from cehrx.zeroshot.outcome import Outcome, Window

log = logging.getLogger("cehrx.zeroshot")

DAY = 86400
CHUNK_DIR = "chunks"
TRAJ_DIR = "trajectories"
MANIFEST = "manifest.json"


ESTIMATORS = ("mc", "hazard")
HAZARD_COLUMNS = ("hazard_sum", "hazard_probability", "hazard_se", "hazard_expected_days")
CIF_POINTS = 10  # cumulative incidence at window_end * k / CIF_POINTS, k = 1..CIF_POINTS


@dataclass
class ZeroshotConfig:
    """The `zeroshot:` config block (sampling and bookkeeping)."""

    estimator: str = "mc"  # which estimate is the prediction (both are computed when the sampling allows)
    num_samples: int = 20
    max_new_tokens: int = 256
    temperature: float = 1.0
    top_k: int = 0
    top_p: float = 1.0
    batch_size: int = 1024  # rows (prompt x sample) per forward batch
    constrained: bool = True
    history_len: int | None = None  # default: the model's max_seq_len - max_new_tokens
    chunk_size: int = 512  # labels per resumable chunk
    write_trajectories: bool = False
    seed: int = 0

    def __post_init__(self) -> None:
        if self.num_samples < 1:
            raise CehrxError(f"zeroshot.num_samples must be >= 1, got {self.num_samples}")
        if self.chunk_size < 1:
            raise CehrxError(f"zeroshot.chunk_size must be >= 1, got {self.chunk_size}")
        if self.estimator not in ESTIMATORS:
            raise CehrxError(f"zeroshot.estimator must be one of {ESTIMATORS}, got {self.estimator!r}")
        if self.estimator == "hazard" and not self.hazard_possible:
            raise CehrxError(
                "zeroshot.estimator=hazard reads the distribution the futures are drawn from: it needs temperature > 0, "
                f"top_k=0 and top_p=1 (got temperature={self.temperature}, top_k={self.top_k}, top_p={self.top_p})"
            )

    @property
    def hazard_possible(self) -> bool:
        return self.temperature > 0 and self.top_k == 0 and self.top_p >= 1.0

    @classmethod
    def from_mapping(cls, m: Any) -> ZeroshotConfig:
        keys = {f for f in cls.__dataclass_fields__}
        return cls(**{k: v for k, v in dict(m).items() if k in keys})

    def history_max_len(self, max_seq_len: int) -> int:
        """Tokens of history a prompt may keep so that history + future fit the model's context."""
        room = max_seq_len - self.max_new_tokens
        n = room if self.history_len is None else min(int(self.history_len), room)
        if n < 16:
            raise CehrxError(
                f"zeroshot.max_new_tokens={self.max_new_tokens} leaves {room} of the model's {max_seq_len} positions for the "
                "history: lower max_new_tokens"
            )
        return n


# ------------------------------------------------------------------------------- scoring


@dataclass
class FutureScores:
    """Per future (sample row): outcome inside the window, resolved, days to the first outcome."""

    has_outcome: np.ndarray  # bool [n]
    resolved: np.ndarray  # bool [n]
    days_to_outcome: np.ndarray  # float64 [n], NaN without outcome
    hazard: np.ndarray | None = None  # float64 [n]: sum_t H_t w_t p_t (see the module doc), with watch probabilities
    hazard_days: np.ndarray | None = None  # float64 [n]: the same terms times their days after the prediction time
    cif: np.ndarray | None = None  # float64 [n, CIF_POINTS]: the terms up to each grid time (finite windows)


def outcome_mask(tokens: np.ndarray, offsets: np.ndarray, outcome: Outcome, vocab_size: int) -> np.ndarray:
    """bool per token: an outcome token (a value-constrained code also needs an allowed Q next)."""
    tokens = np.asarray(tokens, dtype=np.int64)
    is_out = np.zeros(vocab_size, dtype=bool)
    is_out[outcome.token_ids] = True
    mask = is_out[tokens]
    if outcome.allowed_q and mask.any():
        valued = np.zeros(vocab_size, dtype=bool)
        valued[list(outcome.allowed_q)] = True
        pairs = np.array([t * vocab_size + q for t, qs in outcome.allowed_q.items() for q in qs], dtype=np.int64)
        nxt = np.append(tokens[1:], -1)
        last = np.zeros(len(tokens), dtype=bool)
        last[np.asarray(offsets[1:], dtype=np.int64)[np.diff(offsets) > 0] - 1] = True
        nxt[last] = -1  # the next token belongs to another future
        v = mask & valued[tokens]
        mask[v] = np.isin(tokens[v] * vocab_size + nxt[v], pairs) & (nxt[v] >= 0)
    return mask


def score_futures(
    vocab: Vocab,
    outcome: Outcome,
    tokens: np.ndarray,
    offsets: np.ndarray,
    stop: np.ndarray,
    slack_s: np.ndarray,
    watch_prob: np.ndarray | None = None,
) -> FutureScores:
    """Score generated futures (flat tokens/offsets, `stop` reasons of the sampler).

    `slack_s[i]` = prediction time - last history time (seconds, >= 0) of future i's prompt.
    `watch_prob` (per token: P(the step draws a plain outcome token), `hazard_watch_ids`) adds
    the hazard estimator's per-future sums.
    """
    from cehrx.generate.sampler import STOP_DEATH, STOP_END

    tokens = np.asarray(tokens, dtype=np.int64)
    offsets = np.asarray(offsets, dtype=np.int64)
    n = len(offsets) - 1
    lengths = np.diff(offsets)
    seg = np.repeat(np.arange(n), lengths)
    w = outcome.window
    steps = token_seconds(vocab)[tokens]
    elapsed = _segment_cumsum(steps, offsets)  # seconds since the last history token
    slack = np.asarray(slack_s, dtype=np.int64)
    rel = np.maximum(elapsed - slack[seg], 0)  # seconds after the prediction time
    inside = outcome_mask(tokens, offsets, outcome, len(vocab)) & _in_time(rel, w)
    visits_total = np.zeros(n, dtype=np.int64)
    if w.visits is not None:
        nvs = _segment_cumsum((tokens == vocab[VS]).astype(np.int64), offsets)
        inside &= nvs <= w.visits
        visits_total = np.bincount(seg, weights=(tokens == vocab[VS]), minlength=n).astype(np.int64)
    has = np.zeros(n, dtype=bool)
    days = np.full(n, np.nan)
    hit_seg, first = np.unique(seg[inside], return_index=True)
    has[hit_seg] = True
    days[hit_seg] = rel[np.flatnonzero(inside)[first]] / DAY
    total_rel = np.maximum(np.bincount(seg, weights=steps, minlength=n).astype(np.int64) - slack, 0)
    passed = _past_end(total_rel, w)
    if w.visits is not None:
        passed |= visits_total > w.visits
    ended = np.isin(np.asarray(stop), [STOP_END, STOP_DEATH])
    scores = FutureScores(has, has | passed | ended, days)
    if watch_prob is not None:
        is_vs = (tokens == vocab[VS]).astype(np.int64)
        before = _Before(
            rel=np.maximum(elapsed - steps - slack[seg], 0), visits=_segment_cumsum(is_vs, offsets) - is_vs
        )
        _add_hazard(
            scores, vocab, outcome, tokens, offsets, seg, inside, before, np.asarray(watch_prob, dtype=np.float64)
        )
    return scores


@dataclass
class _Before:
    """Per token, what an outcome drawn at its step would have: seconds after the prediction time, visits before it."""

    rel: np.ndarray  # int64 seconds
    visits: np.ndarray  # int64


def hazard_watch_ids(outcome: Outcome) -> np.ndarray:
    """The outcome tokens whose probability the sampler records: those that need no value."""
    return np.setdiff1d(outcome.token_ids, np.asarray(list(outcome.allowed_q), dtype=np.int64))


def _add_hazard(
    scores: FutureScores,
    vocab: Vocab,
    outcome: Outcome,
    tokens: np.ndarray,
    offsets: np.ndarray,
    seg: np.ndarray,
    inside: np.ndarray,
    before: _Before,
    p: np.ndarray,
) -> None:
    """Fill `scores.hazard`, `hazard_days`, `cif` (module doc): the terms H_t w_t p_t of every step up
    to the first outcome in the window, plus the realised indicator of a first outcome that needs a value."""
    n = len(offsets) - 1
    w = outcome.window
    pos = np.arange(len(tokens)) - np.repeat(offsets[:-1], np.diff(offsets))
    first = np.full(n, np.iinfo(np.int64).max)
    np.minimum.at(first, seg[inside], pos[inside])
    alive = pos <= first[seg]  # H_t: no outcome in the window before step t
    in_window = _in_time(before.rel, w)
    if w.visits is not None:
        in_window &= before.visits <= w.visits
    term = np.where(alive & in_window, p, 0.0)
    valued = np.zeros(len(vocab), dtype=bool)
    valued[np.asarray(list(outcome.allowed_q), dtype=np.int64)] = True
    term = term + (
        inside & (pos == first[seg]) & valued[tokens]
    )  # the first outcome needs a value: its realised indicator
    days = before.rel / DAY
    scores.hazard = np.bincount(seg, weights=term, minlength=n)
    scores.hazard_days = np.bincount(seg, weights=term * days, minlength=n)
    if np.isfinite(w.end_days):
        grid = w.end_days * np.arange(1, CIF_POINTS + 1) / CIF_POINTS
        scores.cif = np.stack([np.bincount(seg, weights=term * (days <= g), minlength=n) for g in grid], axis=1)


def _segment_cumsum(values: np.ndarray, offsets: np.ndarray) -> np.ndarray:
    """Inclusive cumulative sum restarting at every segment."""
    c = np.cumsum(values)
    before = np.concatenate([[0], c])[offsets[:-1]]
    return c - np.repeat(before, np.diff(offsets))


def _in_time(rel_s: np.ndarray, w: Window) -> np.ndarray:
    start, end = w.start_days * DAY, w.end_days * DAY
    lower = np.ones(len(rel_s), dtype=bool) if start <= 0 else (rel_s >= start if w.start_inclusive else rel_s > start)
    upper = rel_s <= end if w.end_inclusive else rel_s < end
    return lower & upper


def _past_end(total_rel_s: np.ndarray, w: Window) -> np.ndarray:
    """The future was followed beyond the window's end (an outcome at the end itself would still count)."""
    end = w.end_days * DAY
    return total_rel_s > end if w.end_inclusive else total_rel_s >= end


def aggregate(scores: FutureScores, prompt_index: np.ndarray, n_prompts: int) -> dict[str, np.ndarray]:
    """Per prompt: futures, resolved, with outcome, probability (NaN when none resolved), mean days."""
    pi = np.asarray(prompt_index, dtype=np.int64)
    n = np.bincount(pi, minlength=n_prompts)
    res = np.bincount(pi, weights=scores.resolved, minlength=n_prompts).astype(np.int64)
    pos = np.bincount(pi, weights=scores.has_outcome, minlength=n_prompts).astype(np.int64)
    dsum = np.bincount(pi, weights=np.nan_to_num(scores.days_to_outcome), minlength=n_prompts)
    with np.errstate(invalid="ignore", divide="ignore"):
        prob = np.where(res > 0, pos / np.maximum(res, 1), np.nan)
        days = np.where(pos > 0, dsum / np.maximum(pos, 1), np.nan)
    out = {"n_futures": n, "n_resolved": res, "n_outcome": pos, "probability": prob, "expected_days": days}
    if scores.hazard is not None:
        r = scores.resolved.astype(np.float64)
        hsum = np.bincount(pi, weights=scores.hazard * r, minlength=n_prompts)
        hsq = np.bincount(pi, weights=scores.hazard**2 * r, minlength=n_prompts)
        hdays = np.bincount(pi, weights=scores.hazard_days * r, minlength=n_prompts)
        with np.errstate(invalid="ignore", divide="ignore"):
            mean = np.where(res > 0, hsum / np.maximum(res, 1), np.nan)
            var = np.where(res > 1, (hsq - res * mean**2) / np.maximum(res - 1, 1), np.nan)
            out["hazard_sum"] = hsum
            out["hazard_probability"] = mean
            out["hazard_se"] = np.sqrt(np.maximum(var, 0.0) / np.maximum(res, 1))
            out["hazard_expected_days"] = np.where(hsum > 0, hdays / hsum, np.nan)
            if scores.cif is not None:
                cif = np.stack(
                    [
                        np.bincount(pi, weights=scores.cif[:, k] * r, minlength=n_prompts)
                        for k in range(scores.cif.shape[1])
                    ],
                    axis=1,
                )
                out["hazard_cif"] = np.where(res[:, None] > 0, cif / np.maximum(res, 1)[:, None], np.nan)
    return out


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


def prepare_work_dir(work: Path, fp: str, overwrite: bool) -> int:
    """Create `work/chunks` for run `fp`; returns how many finished chunks it already holds.

    Chunks of a different run (model, labels, outcome or settings changed) are refused unless
    `overwrite`; `overwrite` always starts over.
    """
    chunks = work / CHUNK_DIR
    man = chunks / MANIFEST
    old = json.loads(man.read_text()).get("fingerprint") if man.is_file() else None
    if chunks.is_dir() and any(chunks.iterdir()):
        if overwrite:
            shutil.rmtree(chunks)
        elif old is None:
            raise CehrxError(
                f"{chunks} holds files but no {MANIFEST}: not a zero-shot work dir; pass overwrite=true or use another output_dir"
            )
        elif old != fp:
            raise CehrxError(
                f"{chunks} holds chunks of a different zero-shot run (other model, labels, outcome or settings): "
                "pass overwrite=true to start over, or use another output_dir"
            )
    chunks.mkdir(parents=True, exist_ok=True)
    write_text(man, json.dumps({"fingerprint": fp}) + "\n")
    return len(list(chunks.glob("*.parquet")))


def run_chunks(
    model: Any,
    vocab: Vocab,
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
    max_len = zcfg.history_max_len(model.config.max_seq_len)
    done = 0
    try:
        for k in range(n_chunks):
            path = work / CHUNK_DIR / f"{k}.parquet"
            rows = np.arange(k * zcfg.chunk_size, min((k + 1) * zcfg.chunk_size, n))
            if path.is_file():
                done += 1
            else:
                table, traj = predict_chunk(
                    model, vocab, arrays, labels, rows, outcome, zcfg, max_len, k, progress and n_chunks == 1
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
    return pa.concat_tables(tables) if tables else _empty_chunk()


def predict_chunk(
    model: Any,
    vocab: Vocab,
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
    from cehrx.generate.sampler import STOP_NAMES, SamplingConfig, sample

    hist = cut_histories(arrays, vocab, labels.subject_id[rows], labels.prediction_time[rows], max_len)
    kept = rows[hist.label_index]
    slack = np.maximum(labels.prediction_time[kept] - hist.last_time, 0)
    w = outcome.window
    max_days = None if np.isinf(w.end_days) else float(w.end_days + (slack.max() / DAY if len(slack) else 0.0))
    scfg = SamplingConfig(
        temperature=zcfg.temperature,
        top_k=zcfg.top_k,
        top_p=zcfg.top_p,
        max_new_tokens=zcfg.max_new_tokens,
        max_days=max_days,
        constrained=zcfg.constrained,
        batch_size=zcfg.batch_size,
        seed=chunk_seed(zcfg.seed, chunk),
    )
    out = {c: np.full(len(rows), v) for c, v in (("n_futures", 0), ("n_resolved", 0), ("n_outcome", 0))}
    prob, days = np.full(len(rows), np.nan), np.full(len(rows), np.nan)
    hazard = {c: np.full(len(rows), np.nan) for c in HAZARD_COLUMNS} if zcfg.hazard_possible else {}
    cif = np.full((len(rows), CIF_POINTS), np.nan) if zcfg.hazard_possible and np.isfinite(w.end_days) else None
    stops = {name: np.zeros(len(rows), dtype=np.int64) for name in STOP_NAMES}
    history_len = np.zeros(len(rows), dtype=np.int64)
    traj = None
    if len(kept):
        watch = hazard_watch_ids(outcome) if zcfg.hazard_possible else None
        s = sample(
            model,
            vocab,
            hist.tokens,
            hist.offsets,
            scfg,
            num_samples=zcfg.num_samples,
            progress=progress,
            watch_ids=watch,
        )
        scores = score_futures(vocab, outcome, s.tokens, s.offsets, s.stop, slack[s.prompt_index], s.watch_prob)
        agg = aggregate(scores, s.prompt_index, len(kept))
        local = hist.label_index
        for c, arr in out.items():
            arr[local] = agg[c]
        prob[local], days[local] = agg["probability"], agg["expected_days"]
        for c, arr in hazard.items():
            arr[local] = agg[c]
        if cif is not None:
            cif[local] = agg["hazard_cif"]
        for i, name in enumerate(STOP_NAMES):
            stops[name][local] = np.bincount(s.prompt_index, weights=s.stop == i, minlength=len(kept)).astype(np.int64)
        history_len[local] = hist.lengths()
        if zcfg.write_trajectories:
            traj = trajectories(vocab, s, labels, kept, hist.last_time, zcfg.num_samples, zcfg.seed + chunk)
    has_history = np.zeros(len(rows), dtype=bool)
    has_history[hist.label_index] = True
    table = pa.table(
        {
            "label_row": pa.array(rows.astype(np.int64)),
            "has_history": pa.array(has_history),
            "history_len": pa.array(history_len),
            **{c: pa.array(v.astype(np.int64)) for c, v in out.items()},
            "probability": pa.array(prob),
            "expected_days": pa.array(days),
            **{c: pa.array(v) for c, v in hazard.items()},
            **({} if cif is None else {"hazard_cif": pa.array(list(cif), pa.list_(pa.float64()))}),
            **{f"stop_{k}": pa.array(v) for k, v in stops.items()},
        }
    )
    return table, traj


def chunk_seed(seed: int, chunk: int) -> int:
    return int(seed) * 100_003 + int(chunk)


def trajectories(
    vocab: Vocab, s: Any, labels: LabelInputs, kept: np.ndarray, last_time: np.ndarray, num_samples: int, seed: int
) -> pa.Table:
    """The sampled futures as MEDS rows (+ `prediction_time`, `sample`), times rebuilt from time tokens."""
    offsets = np.asarray(s.offsets, dtype=np.int64)
    steps = token_seconds(vocab)[np.asarray(s.tokens, dtype=np.int64)]
    seg = np.repeat(np.arange(len(offsets) - 1), np.diff(offsets))
    times = last_time[s.prompt_index][seg] + _segment_cumsum(steps, offsets)
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
    column, total = ("probability", "n_outcome") if estimator == "mc" else ("hazard_probability", "hazard_sum")
    if column not in results.column_names:
        raise CehrxError(
            f"zero-shot results hold no {estimator} estimates (the hazard estimator needs temperature > 0, top_k=0, top_p=1)"
        )
    prob = results.column(column).to_numpy(zero_copy_only=False).astype(np.float64)
    res = results.column("n_resolved").to_numpy()
    pos = results.column(total).to_numpy(zero_copy_only=False).astype(np.float64)
    rate = float(np.nansum(pos) / res.sum()) if res.sum() else 0.0
    fb = ~np.isfinite(prob)
    return np.where(fb, rate, prob), fb, rate


def config_dict(zcfg: ZeroshotConfig) -> dict[str, Any]:
    return asdict(zcfg)
