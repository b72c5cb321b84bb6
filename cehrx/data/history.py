"""Patient histories cut at prediction times: what probe and zero-shot feed the model.

A label `(subject_id, prediction_time)` sees exactly the tokens whose time is `<= prediction_time`.
Token times are the earliest moment each token is known (see `cehrx.data.shards`), so this is a
prefix of the subject's sequence, and nothing recorded later (including date-only events of the
same day, which `prepare` places at 23:59:59) can leak into a feature.

A prefix longer than `max_len` keeps its most recent tokens, starting at a `[VS]` so the window
obeys the grammar, with the 4-token demographic prompt recomputed for that visit (year and age
at the visit, as pretraining crops do). When even the last visit alone is longer than the
window, the window starts inside that visit behind its `[VS] VISIT//<type>` header
(`Histories.stats["truncated_mid_visit"]` counts those).

Everything is vectorised over labels: no Python loop per label or per token.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from cehrx.data import shards
from cehrx.data.shards import PROMPT_LEN, SPLITS, TokenArrays
from cehrx.data.vocab import VS, Vocab
from cehrx.errors import CehrxError

NO_SUBJECT = "no_subject"
NO_HISTORY = "no_token_before_prediction_time"


@dataclass
class Histories:
    """Flat cut sequences: history i is `tokens[offsets[i]:offsets[i+1]]` (prompt first)."""

    tokens: np.ndarray  # int32 [total]
    offsets: np.ndarray  # int64 [n+1]
    times: np.ndarray  # int64 [total], seconds
    label_index: np.ndarray  # int64 [n]: row of the labels table each history belongs to
    last_time: np.ndarray  # int64 [n]: time (s) of the last kept token
    dropped: dict[str, int]  # labels without a usable history, by reason
    stats: dict[str, int] = field(default_factory=dict)  # truncation counts

    def __len__(self) -> int:
        return len(self.label_index)

    def lengths(self) -> np.ndarray:
        return np.diff(self.offsets)

    def packed(self, idx: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """Histories `idx` as the model's packed input: int64 tokens concatenated, int32 `cu_seqlens`."""
        idx = np.asarray(idx, dtype=np.int64)
        lens = self.offsets[idx + 1] - self.offsets[idx]
        cu = np.concatenate([[0], np.cumsum(lens)]).astype(np.int64)
        flat = np.repeat(self.offsets[idx] - cu[:-1], lens) + np.arange(cu[-1])  # gather indices into tokens
        return np.asarray(self.tokens[flat], dtype=np.int64), cu.astype(np.int32)

    def take(self, idx: np.ndarray) -> "Histories":
        """Histories `idx`, in that order (e.g. the ones a feature cache lacks)."""
        idx = np.asarray(idx, dtype=np.int64)
        lens = self.lengths()[idx]
        offsets = np.concatenate([[0], np.cumsum(lens)]).astype(np.int64)
        flat = np.repeat(self.offsets[idx] - offsets[:-1], lens) + np.arange(offsets[-1])
        return Histories(
            self.tokens[flat],
            offsets,
            self.times[flat],
            self.label_index[idx],
            self.last_time[idx],
            dict(self.dropped),
            dict(self.stats),
        )


def subject_rows(arrays: TokenArrays, subject_ids: np.ndarray) -> np.ndarray:
    """Row of each subject id in `arrays` (-1 when absent). Subject ids must be unique in `arrays`."""
    sid = np.asarray(arrays.subject_id, dtype=np.int64)
    order = np.argsort(sid, kind="stable")
    sorted_ids = sid[order]
    q = np.asarray(subject_ids, dtype=np.int64)
    pos = np.clip(np.searchsorted(sorted_ids, q), 0, max(len(sorted_ids) - 1, 0))
    found = (sorted_ids[pos] == q) if len(sorted_ids) else np.zeros(len(q), dtype=bool)
    return np.where(found, order[pos] if len(order) else -1, -1).astype(np.int64)


def count_known(arrays: TokenArrays, rows: np.ndarray, prediction_times: np.ndarray) -> np.ndarray:
    """Tokens of subject `rows[i]` with time <= `prediction_times[i]` (a prefix length), vectorised.

    One `searchsorted` on a composite `(row, time)` key: per subject the times are
    non-decreasing, so the flat key array is sorted.
    """
    times = np.asarray(arrays.times, dtype=np.int64)
    lengths = arrays.lengths().astype(np.int64)
    if len(times) == 0 or len(rows) == 0:
        return np.zeros(len(rows), dtype=np.int64)
    t = np.asarray(prediction_times, dtype=np.int64)
    lo = int(times.min())
    hi = int(times.max())
    t = np.clip(t, lo - 1, hi)  # before everything / after everything
    span_bits = int(hi - lo + 2).bit_length()
    if span_bits + len(lengths).bit_length() > 62:
        raise CehrxError(f"token times span {hi - lo} s over {len(lengths)} subjects: too wide for the history index")
    row_of_token = np.repeat(np.arange(len(lengths), dtype=np.int64), lengths)
    key = (row_of_token << span_bits) | (times - lo + 1)
    qkey = (rows.astype(np.int64) << span_bits) | (t - lo + 1)
    end = np.searchsorted(key, qkey, side="right")
    return end - np.asarray(arrays.offsets, dtype=np.int64)[rows]


def cut_histories(
    arrays: TokenArrays,
    vocab: Vocab,
    subject_ids: np.ndarray,
    prediction_times: np.ndarray,
    max_len: int,
) -> Histories:
    """Each label's history: tokens with time <= prediction_time, left-truncated to `max_len`.

    `prediction_times` are int64 seconds since 1970 (see `cehrx.probe.labels.times_seconds`).
    Labels whose subject is not in `arrays`, or who have nothing but (at most) the prompt by
    their prediction time, are dropped and counted in `Histories.dropped`.
    """
    if max_len < PROMPT_LEN + 2:
        raise CehrxError(
            f"probe max_len={max_len} is too short: it must hold the {PROMPT_LEN}-token prompt and a visit"
        )
    subject_ids = np.asarray(subject_ids, dtype=np.int64)
    rows = subject_rows(arrays, subject_ids)
    has_subject = rows >= 0
    n_known = np.zeros(len(rows), dtype=np.int64)
    n_known[has_subject] = count_known(
        arrays, rows[has_subject], np.asarray(prediction_times, dtype=np.int64)[has_subject]
    )
    usable = has_subject & (n_known > PROMPT_LEN)
    dropped = {NO_SUBJECT: int((~has_subject).sum()), NO_HISTORY: int((has_subject & ~usable).sum())}
    label_index = np.flatnonzero(usable).astype(np.int64)
    rows, n_known = rows[label_index], n_known[label_index]
    start, mid_visit, header = _window_starts(arrays, vocab, rows, n_known, max_len)
    tokens, offsets, times = _gather(arrays, vocab, rows, start, n_known, header)
    stats = {"truncated": int((start > PROMPT_LEN).sum()), "truncated_mid_visit": int(mid_visit.sum())}
    last_time = times[offsets[1:] - 1] if len(label_index) else np.zeros(0, dtype=np.int64)
    return Histories(tokens, offsets, times, label_index, last_time, dropped, stats)


def _window_starts(
    arrays: TokenArrays, vocab: Vocab, rows: np.ndarray, n_known: np.ndarray, max_len: int
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Body start (relative to the subject) of each window, whether it is mid-visit, and the
    global position of the `[VS]` whose 2-token header precedes a mid-visit window (-1 if none).

    The window holds the prompt plus the body `[start, n_known)`; with room `max_len - PROMPT_LEN`
    the start is the first `[VS]` at or after `n_known - room` (that `[VS]` included).

    Unlike a training crop (`packing.crop_starts`: any visit from which a full-length crop fits,
    drawn at random; none: the record's beginning), a history must end at its prediction time, so
    only that last visit qualifies, and with none inside the window it starts mid-visit behind the
    visit's 2-token header. A generation window (`generate/windows._next_windows`) uses the same
    search over its own generated tokens, and ends the patient when it finds no visit.
    """
    off = np.asarray(arrays.offsets, dtype=np.int64)[rows]
    room = max_len - PROMPT_LEN
    start = np.full(len(rows), PROMPT_LEN, dtype=np.int64)
    header = np.full(len(rows), -1, dtype=np.int64)
    long = np.flatnonzero(n_known - PROMPT_LEN > room)
    if not len(long):
        return start, np.zeros(len(rows), dtype=bool), header
    vs = np.flatnonzero(np.asarray(arrays.tokens) == vocab[VS]).astype(np.int64)
    k, ok = shards.first_visit_in(vs, off[long] + n_known[long] - room, off[long] + n_known[long])
    start[long[ok]] = vs[k[ok]] - off[long[ok]]
    mid = np.zeros(len(rows), dtype=bool)
    bad = long[~ok]  # no visit starts inside the window: start mid-visit behind its header
    if len(bad):
        mid[bad] = True
        start[bad] = n_known[bad] - (room - 2)
        prev = np.searchsorted(vs, off[bad] + start[bad], side="right") - 1
        has_vs = (prev >= 0) & (vs[np.maximum(prev, 0)] >= off[bad] + PROMPT_LEN)
        header[bad[has_vs]] = vs[prev[has_vs]]
        start[bad[~has_vs]] = n_known[bad[~has_vs]] - room  # no visit at all: plain tail
        # a value token (Q<k>) belongs to the code before it: a window never starts on an orphan value
        kinds = np.asarray(vocab.kinds, dtype=object)
        orphan = bad[
            (kinds[np.asarray(arrays.tokens)[off[bad] + start[bad]]] == "quantile") & (start[bad] + 1 < n_known[bad])
        ]
        start[orphan] += 1
    return start, mid, header


def _gather(
    arrays: TokenArrays, vocab: Vocab, rows: np.ndarray, start: np.ndarray, n_known: np.ndarray, header: np.ndarray
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Flat `(tokens, offsets, times)`: prompt (recomputed when cropped), optional visit header, body."""
    off = np.asarray(arrays.offsets, dtype=np.int64)[rows]
    n_head = np.where(header >= 0, 2, 0)
    body = n_known - start
    lengths = PROMPT_LEN + n_head + body
    offsets = np.concatenate([[0], np.cumsum(lengths)]).astype(np.int64)
    total = int(offsets[-1])
    seq = np.repeat(np.arange(len(rows)), lengths)
    pos = np.arange(total, dtype=np.int64) - offsets[:-1][seq]  # position within the window
    # source index: prompt -> off + pos; header -> header + (pos - PROMPT_LEN); body -> off + start + ...
    src = off[seq] + pos
    in_head = (pos >= PROMPT_LEN) & (pos < PROMPT_LEN + n_head[seq])
    src = np.where(in_head, header[seq] + pos - PROMPT_LEN, src)
    in_body = pos >= PROMPT_LEN + n_head[seq]
    src = np.where(in_body, off[seq] + start[seq] + (pos - PROMPT_LEN - n_head[seq]), src)
    tokens = np.asarray(arrays.tokens, dtype=np.int32)[src]
    times = np.asarray(arrays.times, dtype=np.int64)[src]
    cropped = np.flatnonzero(start > PROMPT_LEN)
    if len(cropped):
        first = offsets[cropped] + PROMPT_LEN  # first token after the prompt in the window
        t0 = times[first]
        idx = (offsets[cropped][:, None] + np.arange(PROMPT_LEN)).ravel()  # the subject's own prompt, so far
        prompt = shards.prompt_ids(vocab, t0, np.asarray(arrays.birth_time, dtype=np.int64)[rows[cropped]], tokens[idx])
        tokens[idx] = prompt.ravel()
        times[idx] = np.repeat(t0, PROMPT_LEN)
    return tokens, offsets, times


def load_all_splits(prepared_dir: str | Path) -> tuple[TokenArrays, np.ndarray]:
    """Every split of a prepared dir as one `TokenArrays`, plus each subject's split name.

    Probe and zero-shot need labels from any split (fit on train + tuning, score on held_out).
    """
    parts = [(s, shards.load_split(prepared_dir, s)) for s in SPLITS if (Path(prepared_dir) / "tokens" / s).is_dir()]
    if not parts:
        raise CehrxError(f"{prepared_dir} has no tokens/<split> directories: run `cehrx task=prepare`")
    return concat_arrays([a for _, a in parts]), np.concatenate([np.full(len(a), s, dtype="<U8") for s, a in parts])


def concat_arrays(parts: list[TokenArrays]) -> TokenArrays:
    """Concatenate `TokenArrays` (offsets shifted)."""
    starts = np.cumsum([0] + [len(p.tokens) for p in parts])
    return TokenArrays(
        subject_id=np.concatenate([np.asarray(p.subject_id, dtype=np.int64) for p in parts]),
        offsets=np.concatenate([[0]] + [np.asarray(p.offsets[1:], dtype=np.int64) + s for p, s in zip(parts, starts)]),
        tokens=np.concatenate([np.asarray(p.tokens, dtype=np.int32) for p in parts]),
        times=np.concatenate([np.asarray(p.times, dtype=np.int64) for p in parts]),
        birth_time=np.concatenate([np.asarray(p.birth_time, dtype=np.int64) for p in parts]),
    )
