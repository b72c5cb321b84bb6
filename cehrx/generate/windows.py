"""Patients longer than the model's context: sample in windows, the way the model saw them in training.

Pretraining never shows a whole long patient: it shows crops of `max_seq_len` tokens that start at
a `[VS]`, behind a demographic prompt `[YEAR, AGE, GENDER, RACE]` recomputed for that visit
(`cehrx.data.datamodule`). Generation continues a patient in the same form. When a sample fills
the context, its last visits (at most `keep` tokens, from the first `[VS]` that fits) become the
next window's history, behind a prompt recomputed for that visit, and sampling goes on. A patient
stops for good at `[END]` or `[DEATH]`, when no `[VS]` lies within the last `keep` tokens (one
visit longer than that), or at `max_total_tokens` generated tokens.

Synthea-like lifelong records are several contexts long (Synthea 20k: median 2,337 tokens against a
1,024-token context); one window would end every synthetic patient in childhood.

Time in the recomputed prompts: each patient gets a reference clock (1 July of its first prompt's
year, born `AGE + 0.5` years earlier) advanced by its generated time tokens; `decode_samples` later
draws the actual dates. The year and age of a later window can therefore be off by one from the
decoded dates, as a crop's prompt is off by the day within its year.
"""

from __future__ import annotations

import numpy as np

from cehrx.data.decode import token_seconds
from cehrx.data.shards import PROMPT_LEN, SECONDS_PER_YEAR, first_visit_in, prompt_ids
from cehrx.data.vocab import VS, Vocab
from cehrx.errors import CehrxError
from cehrx.generate.patients import value_lookup
from cehrx.sampling import STOP_TOKENS, Engine, Samples

ROUND_SEED_STRIDE = 1_000_003  # round r samples with seed + r * stride: its draws differ from every other round's


def sample_windows(
    engine: Engine,
    prompts: np.ndarray,
    *,
    max_total_tokens: int | None = None,
    keep: int | None = None,
    end_time: int | None = None,
    progress: bool = False,
) -> Samples:
    """Continue each `[YEAR, AGE, GENDER, RACE]` prompt (`[n, 4]`) once, across as many windows as it takes.

    Returns one `Samples` row per prompt (generated tokens of every window, in order; `stop` the last
    window's reason, `STOP_TOKENS` also for a patient cut by `max_total_tokens` or by a visit longer
    than `keep`). `max_total_tokens=None` samples one window (plain `engine.sample`). `keep` defaults
    to half the context. `end_time` (seconds since 1970: the real data's last event) ends a record where
    the real ones end: no new window starts after it, and each patient is cut at its first token past
    it (stop `STOP_TOKENS`: decoding then keeps the visits before it), as a model under-generates
    `[END]` when training crops rarely hold a record's end. Window r samples with the engine's seed
    plus `r * ROUND_SEED_STRIDE`.
    """
    vocab, prompts = engine.vocab, np.asarray(prompts, dtype=np.int64)
    n, ctx = len(prompts), engine.model.config.max_seq_len
    offsets = np.arange(0, PROMPT_LEN * n + 1, PROMPT_LEN, dtype=np.int64)
    first = engine.sample(prompts.reshape(-1), offsets, num_samples=1, progress=progress)
    if max_total_tokens is None:
        return first
    keep = ctx // 2 if keep is None else int(keep)
    if not 1 <= keep <= ctx - PROMPT_LEN - 2:
        raise CehrxError(
            f"generate window keep={keep}: must be 1..{ctx - PROMPT_LEN - 2} tokens so that a window has room to grow"
        )
    if max_total_tokens < 1:
        raise CehrxError(f"generate.max_total_tokens={max_total_tokens}: must be >= 1 (or null for one window)")
    parts = [first.sequence(i) for i in range(n)]
    stop, days = first.stop.copy(), first.elapsed_days.copy()
    clock = _Clock(vocab, prompts)
    active = np.flatnonzero(stop == STOP_TOKENS)
    for r in range(1, 1 + 4 * max_total_tokens // max(ctx - PROMPT_LEN - keep, 1)):
        active = active[np.array([len(parts[i]) for i in active], dtype=np.int64) < max_total_tokens]
        rows, tokens, offs = _next_windows(vocab, prompts, parts, active, keep, clock, end_time)
        if not len(rows):
            break
        round_engine = engine.with_settings(seed=int(engine.cfg.seed) + r * ROUND_SEED_STRIDE)
        s = round_engine.sample(tokens, offs, num_samples=1, progress=progress, prompt_ids=rows)
        for j, i in enumerate(rows):
            parts[i] = np.concatenate([parts[i], s.sequence(j)])
        stop[rows], days[rows] = s.stop, days[rows] + s.elapsed_days
        active = rows[s.stop == STOP_TOKENS]
    return _joined(parts, stop, days, clock, end_time, max_total_tokens)


def _joined(
    parts: list[np.ndarray],
    stop: np.ndarray,
    days: np.ndarray,
    clock: _Clock,
    end_time: int | None,
    max_total_tokens: int,
) -> Samples:
    """Each patient's windows as one `Samples` row, cut at `end_time` and at `max_total_tokens` (stop `STOP_TOKENS`)."""
    n = len(parts)
    if end_time is not None:
        for i, p in enumerate(parts):  # per patient, vectorised over its tokens
            past = np.flatnonzero(clock.start[i] + np.cumsum(clock.seconds[p]) > end_time)
            if len(past):
                parts[i], stop[i] = p[: past[0]], STOP_TOKENS
    lengths = np.array([min(len(p), max_total_tokens) for p in parts], dtype=np.int64)
    stop[lengths < np.array([len(p) for p in parts])] = STOP_TOKENS
    flat = np.concatenate([p[:k] for p, k in zip(parts, lengths)]).astype(np.int32) if n else np.zeros(0, np.int32)
    return Samples(
        tokens=flat,
        offsets=np.concatenate([[0], np.cumsum(lengths)]).astype(np.int64),
        stop=stop,
        elapsed_days=days,
        prompt_index=np.arange(n, dtype=np.int64),
    )


class _Clock:
    """Each patient's reference start and birth (seconds since 1970) and each token's seconds."""

    def __init__(self, vocab: Vocab, prompts: np.ndarray) -> None:
        years = value_lookup(vocab, "year")[prompts[:, 0]]
        ages = value_lookup(vocab, "age")[prompts[:, 1]]
        if ((years < 0) | (ages < 0)).any():
            raise CehrxError("windowed generation needs prompts with a known year and age")
        july = (years - 1970).astype("datetime64[Y]").astype("datetime64[D]").astype(np.int64) + 181
        self.start = july * 86400
        self.birth = (self.start - (ages + 0.5) * SECONDS_PER_YEAR).astype(np.int64)
        self.seconds = token_seconds(vocab)


def _next_windows(
    vocab: Vocab,
    prompts: np.ndarray,
    parts: list[np.ndarray],
    active: np.ndarray,
    keep: int,
    clock: _Clock,
    end_time: int | None = None,
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """The next window's prompt of each active patient that has a `[VS]` in its last `keep` tokens.

    The window starts at the first visit of those tokens (`shards.first_visit_in`, the search of the
    other visit-aligned crops) behind the prompt recomputed for it (`shards.prompt_ids`). Unlike a
    training crop (`packing.crop_starts`: a random visit from which a full crop fits) it continues
    the patient's end, like a history (`history._window_starts`); unlike a history, with no visit
    there (one visit longer than `keep`) it does not start mid-visit: the patient ends.
    """
    seqs = [np.concatenate([prompts[i], parts[i]]) for i in active]
    lengths = np.array([len(s) for s in seqs], dtype=np.int64)
    ends = np.cumsum(lengths)
    begins = ends - lengths
    visit_starts = np.flatnonzero(np.concatenate(seqs) == vocab[VS]) if seqs else np.zeros(0, np.int64)
    k, found = first_visit_in(visit_starts, np.maximum(ends - keep, begins + PROMPT_LEN), ends)
    rows, starts, bodies = [], [], []
    for j in np.flatnonzero(found):
        i, seq = active[j], seqs[j]
        p = int(visit_starts[k[j]] - begins[j])
        elapsed = np.cumsum(clock.seconds[seq])
        if end_time is not None and clock.start[i] + int(elapsed[-1]) > end_time:
            continue  # the record already runs past the data's end: no further window
        rows.append(i)
        starts.append(clock.start[i] + int(elapsed[p]))
        bodies.append(seq[p:])
    if not rows:
        return np.zeros(0, np.int64), np.zeros(0, np.int64), np.zeros(1, np.int64)
    rows = np.asarray(rows, dtype=np.int64)
    heads = prompt_ids(vocab, np.asarray(starts, dtype=np.int64), clock.birth[rows], prompts[rows])
    seqs = [np.concatenate([h.astype(np.int64), b]) for h, b in zip(heads, bodies)]
    offs = np.concatenate([[0], np.cumsum([len(s) for s in seqs])]).astype(np.int64)
    return rows, np.concatenate(seqs), offs
