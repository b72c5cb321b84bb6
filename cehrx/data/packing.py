"""Visit-aligned crops of patients, packed into flat batches with `cu_seqlens`.

- **Crops start at a visit.** A patient longer than `max_seq_len` is cropped to a window that
  starts at a `[VS]` token, with the demographic prompt (YEAR, AGE, GENDER, RACE) recomputed
  for that visit, so every sample obeys the grammar of DESIGN §4. A patient that fits is taken
  whole and ends with `[END]` (so does a crop that reaches the end of the record, unless
  `end_token="after_death"` and the record does not end in `[DEATH]`). Which crop:
  `token_uniform_crops` (default, every token equally often) or `crop_starts` (`crop_sampling=visits`).
- **Packing, not padding.** Samples are packed into a token budget as one flat stream with
  `cu_seqlens` (flash-attn's varlen convention): positions restart per patient, the last label
  of every patient is -100, so neither attention nor the loss ever crosses a patient boundary.
  `pad_to` pads T to the budget (padding segments, labels -100) for static shapes under
  `torch.compile`. `pack_lengths` also packs probe and fine-tune batches.

Everything per token is numpy-vectorised; Python loops run per batch at most.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import numpy as np
import torch

from cehrx.data import shards
from cehrx.data.shards import PROMPT_LEN, TokenArrays
from cehrx.data.vocab import DEATH, Vocab

IGNORE_INDEX = -100  # label of positions without a target (a patient's last token, padding)


@dataclass
class Samples:
    """One crop per row; `start`/`n_body` index the subject's own tokens (prompt excluded)."""

    subject: np.ndarray  # int64 row in TokenArrays
    start: np.ndarray  # int64 first body token, relative to the subject (>= PROMPT_LEN)
    n_body: np.ndarray  # int64 body tokens taken
    end: np.ndarray  # bool: append [END] (the crop reaches the end of the record; see `end_token`)
    prompt: np.ndarray  # int32 [n, PROMPT_LEN]
    prompt_time: np.ndarray  # int64 [n, PROMPT_LEN]

    def __len__(self) -> int:
        return len(self.subject)

    @property
    def lengths(self) -> np.ndarray:
        return PROMPT_LEN + self.n_body + self.end

    def take(self, idx: np.ndarray) -> "Samples":
        return Samples(*(getattr(self, f)[idx] for f in ("subject", "start", "n_body", "end", "prompt", "prompt_time")))


def crop_starts(
    arrays: TokenArrays, visit_starts: np.ndarray, max_seq_len: int, rng: np.random.Generator | None
) -> np.ndarray:
    """Start (relative to each subject) of every subject's crop; `PROMPT_LEN` for whole sequences.

    A crop holds the prompt, then body tokens from a `[VS]`, then `[END]` if it reaches the end.
    Candidates are the visits from which a full-length crop fits, plus the first visit from
    which the crop reaches the end (so `[END]` is learned for long patients too). `rng=None`
    picks that last candidate (the deterministic validation window); otherwise uniform. A record
    with no candidate starts at its beginning and is cut at `max_seq_len`.

    How the other visit-aligned crops differ (all find a visit with `shards.first_visit_in` and get
    their prompt from `shards.prompt_ids`): a history (`history._window_starts`) must end at its
    prediction time, so it takes only the last candidate and, with none, starts mid-visit behind
    the visit's header; a generation window (`generate/windows._next_windows`) starts at the first
    visit of the last `keep` generated tokens and, with none, ends the patient.
    """
    off, length = arrays.offsets[:-1], arrays.lengths()
    room = max_seq_len - PROMPT_LEN  # body tokens + [END] a crop can hold
    bound = length + 1 - room  # a crop from `p` reaches the end (incl. [END]) iff p >= bound
    first = np.searchsorted(visit_starts, off + PROMPT_LEN)
    last = np.searchsorted(visit_starts, off + length)  # visits of subject i: [first, last)
    k, reaches = shards.first_visit_in(visit_starts, off + np.maximum(bound, PROMPT_LEN), off + length)
    count = (np.clip(k, first, last) - first) + reaches  # visits of full-length crops, + the one reaching the end
    if rng is None:
        pick = first + count - 1
    else:
        pick = first + np.floor(rng.random(len(off)) * count).astype(np.int64)
    has = count > 0
    starts = np.full(len(off), PROMPT_LEN, dtype=np.int64)
    starts[has] = visit_starts[pick[has]] - off[has]
    starts[length + 1 <= max_seq_len] = PROMPT_LEN  # fits whole
    return starts


def token_uniform_crops(
    arrays: TokenArrays, visit_starts: np.ndarray, max_seq_len: int, rng: np.random.Generator
) -> tuple[np.ndarray, np.ndarray]:
    """`(start, stop)` of crops that cover every token of a long record equally often.

    Why: `crop_starts` picks a start visit among the full-length crops, so a record's last
    `max_seq_len` tokens (its `[DEATH]` or `[END]`) are in one crop of a hundred: on Synthea 20k
    a death in a long record is trained 23x less often than it occurs (3.3 per million trained
    tokens against 75 in the data), and the model under-predicts death tenfold. Here a nominal
    window `[u, u + room)` is drawn with `u` uniform over every position from which it overlaps
    the body or `[END]`, so each of those positions is covered by `room` values of `u`; the crop
    then starts at the visit holding `max(u, first body token)` (a window near the start is
    shorter and ends mid-record, one near the end is shorter and reaches the end). Snapping to a
    visit makes coverage uniform to within about a visit's length (the end ~5 % below the middle
    on Synthea); a visit longer than the context is never covered whole, as with `crop_starts`.
    Records that fit are taken whole, as by `crop_starts`. Body and `[END]` are `[start, stop)`,
    relative to the subject; `stop == length + 1` means the crop ends with `[END]`.
    """
    off, length = arrays.offsets[:-1].astype(np.int64), arrays.lengths().astype(np.int64)
    room = max_seq_len - PROMPT_LEN
    span = length + room - PROMPT_LEN  # values of u in [PROMPT_LEN - room + 1, length]
    u = PROMPT_LEN - room + 1 + np.floor(rng.random(len(off)) * span).astype(np.int64)
    a = np.maximum(u, PROMPT_LEN)
    k = np.searchsorted(visit_starts, off + a, side="right") - 1  # the visit holding position a
    first = np.searchsorted(visit_starts, off + PROMPT_LEN)  # the subject's first visit
    vs = visit_starts[np.clip(k, 0, max(len(visit_starts) - 1, 0))] if len(visit_starts) else off + PROMPT_LEN
    start = np.where((k >= first) & (k >= 0), vs - off, PROMPT_LEN)
    stop = np.minimum(np.minimum(u + room, start + room), length + 1)
    whole = length + 1 <= max_seq_len
    start[whole], stop[whole] = PROMPT_LEN, length[whole] + 1
    return start, stop


CROP_SAMPLING = ("visits", "tokens")
END_TOKEN = ("always", "after_death")


def gets_end(arrays: TokenArrays, vocab: Vocab, end_token: str) -> np.ndarray:
    """bool per record: does its end get `[END]` (`always`: every record; `after_death`: those ending in `[DEATH]`)."""
    if end_token != "after_death":
        return np.ones(len(arrays), dtype=bool)
    off, length = arrays.offsets[:-1].astype(np.int64), arrays.lengths().astype(np.int64)
    return np.asarray(arrays.tokens[np.maximum(off + length - 1, 0)]) == vocab[DEATH]


def check_crop_options(sampling: str, end_token: str) -> None:
    """A clear error for a `crop_sampling` or `end_token` that is not one of the choices."""
    if sampling not in CROP_SAMPLING:
        raise ValueError(f"crop_sampling={sampling!r}: choose one of {', '.join(CROP_SAMPLING)}")
    if end_token not in END_TOKEN:
        raise ValueError(f"end_token={end_token!r}: choose one of {', '.join(END_TOKEN)}")


def make_samples(
    arrays: TokenArrays,
    visit_starts: np.ndarray,
    vocab: Vocab,
    max_seq_len: int,
    rng: np.random.Generator | None,
    sampling: str = "tokens",
    end_token: str = "always",
) -> Samples:
    """Crops of every subject with their prompts, as flat arrays.

    `sampling="visits"`: `crop_starts` (a start visit uniformly among the full-length crops);
    `"tokens"`: `token_uniform_crops` (every token of a record equally likely to be trained).
    Validation (`rng=None`) always takes `crop_starts`' deterministic last window.

    `end_token`: which crops that reach a record's end get `[END]` (a target of the token before it).
    `"always"`; `"after_death"`: only a record that ends in `[DEATH]`. Why: an alive record ends where
    the extract ends (censoring, which `generate.end_date` models), not where anything happens to the
    patient; a model trained on `[END]` there ends generated records at random years.
    """
    check_crop_options(sampling, end_token)
    n = len(arrays)
    off, length = arrays.offsets[:-1].astype(np.int64), arrays.lengths().astype(np.int64)
    room = max_seq_len - PROMPT_LEN
    if sampling == "tokens" and rng is not None:
        start, stop = token_uniform_crops(arrays, visit_starts, max_seq_len, rng)
        take = stop - start
    else:
        start = crop_starts(arrays, visit_starts, max_seq_len, rng)
        take = np.minimum(length + 1 - start, room)  # body tokens + [END]
    reaches = start + take == length + 1
    n_body = np.maximum(take - reaches, 0)
    end = reaches & gets_end(arrays, vocab, end_token)
    pidx = off[:, None] + np.arange(PROMPT_LEN)
    prompt = np.asarray(arrays.tokens[pidx.ravel()], dtype=np.int32).reshape(n, PROMPT_LEN)
    prompt_time = np.asarray(arrays.times[pidx.ravel()], dtype=np.int64).reshape(n, PROMPT_LEN)
    cropped = np.flatnonzero(start > PROMPT_LEN)
    if len(cropped):
        g = off[cropped] + start[cropped]
        t0 = np.asarray(arrays.times[g], dtype=np.int64)
        prompt[cropped] = shards.prompt_ids(vocab, t0, np.asarray(arrays.birth_time)[cropped], prompt[cropped])
        prompt_time[cropped] = t0[:, None]
    return Samples(np.arange(n, dtype=np.int64), start, n_body, end, prompt, prompt_time)


def pack_lengths(lengths: np.ndarray, budget: int, lookahead: int = 256, max_fill: int = 8) -> list[np.ndarray]:
    """Group items, in the given order, into batches whose lengths sum to at most `budget`.

    Next-fit over the order (one `cumsum` + `searchsorted` per batch), then the batch's spare
    room is topped up with the largest of the next `lookahead` items that still fit (at most
    `max_fill` of them). Returns index arrays into `lengths`; every item appears exactly once.

    >>> [b.tolist() for b in pack_lengths(np.array([6, 5, 3, 4]), 10)]
    [[0, 3], [1, 2]]
    """
    lengths = np.asarray(lengths, dtype=np.int64)
    if len(lengths) and lengths.max() > budget:
        raise ValueError(f"a sample of {int(lengths.max())} tokens exceeds the batch budget of {budget} tokens")
    n = len(lengths)
    taken = np.zeros(n, dtype=bool)
    window = budget // max(int(lengths.min()) if n else 1, 1) + 1 + lookahead
    batches: list[np.ndarray] = []
    head = 0
    while head < n:
        free = np.flatnonzero(~taken[head : head + window]) + head
        if not len(free):
            head += window
            continue
        head = int(free[0])
        csum = np.cumsum(lengths[free])
        k = max(int(np.searchsorted(csum, budget, side="right")), 1)
        chosen, room = [free[:k]], budget - int(csum[k - 1])
        rest = free[k : k + lookahead]
        for _ in range(max_fill):
            fit = rest[lengths[rest] <= room]
            if room <= 0 or not len(fit):
                break
            j = fit[np.argmax(lengths[fit])]
            chosen.append(np.array([j]))
            room -= int(lengths[j])
            rest = rest[rest != j]
        batch = np.concatenate(chosen)
        taken[batch] = True
        batches.append(batch)
    return batches


def collate_packed(
    arrays: TokenArrays,
    s: Samples,
    end_id: int,
    pad_id: int,
    pad_to: int | None = None,
    pad_segment: int | None = None,
    max_seqlen: int | None = None,
) -> dict[str, Any]:
    """One flat packed batch from samples (vectorised gathers from the memory-mapped arrays).

    Layout per sample: prompt, body tokens, optional `[END]`. `labels` are the next token,
    -100 at every sample's last position and on padding. With `pad_to`, T is padded to that
    many tokens with `[PAD]` segments of at most `pad_segment` tokens (own positions, labels
    -100), so attention over padding stays within the usual sequence length.
    """
    lens = s.lengths.astype(np.int64)
    seg = np.concatenate([[0], np.cumsum(lens)])
    t_real = int(seg[-1])
    total = max(pad_to or 0, t_real)
    ids = np.full(total, pad_id, dtype=np.int64)
    times = np.zeros(total, dtype=np.int64)
    pidx = (seg[:-1, None] + np.arange(PROMPT_LEN)).ravel()
    ids[pidx], times[pidx] = s.prompt.ravel(), s.prompt_time.ravel()
    nb = s.n_body.astype(np.int64)
    within = np.arange(int(nb.sum())) - np.repeat(np.cumsum(nb) - nb, nb)
    dst = np.repeat(seg[:-1] + PROMPT_LEN, nb) + within
    src = np.repeat(arrays.offsets[s.subject].astype(np.int64) + s.start, nb) + within
    ids[dst], times[dst] = arrays.tokens[src], arrays.times[src]
    epos = (seg[:-1] + PROMPT_LEN + nb)[s.end.astype(bool)]
    ids[epos], times[epos] = end_id, times[epos - 1]
    labels = np.full(total, IGNORE_INDEX, dtype=np.int64)
    if t_real:
        labels[: t_real - 1] = ids[1:t_real]
        labels[seg[1:] - 1] = IGNORE_INDEX
    if total > t_real:  # trailing padding segments, each at most pad_segment long
        step = pad_segment or total
        seg = np.concatenate([seg, np.arange(t_real + step, total, step), [total]])
        lens = np.diff(seg)
    positions = np.arange(total) - np.repeat(seg[:-1], lens)
    longest = int(lens.max()) if len(lens) else 0
    return {
        "input_ids": torch.from_numpy(ids),
        "labels": torch.from_numpy(labels),
        "position_ids": torch.from_numpy(positions),
        "cu_seqlens": torch.from_numpy(seg.astype(np.int32)),
        "max_seqlen": max(longest, max_seqlen or 0),
        "times": torch.from_numpy(times),
        "n_tokens": t_real,
    }


def empty_batch(
    pad_id: int, pad_to: int | None = None, pad_segment: int | None = None, max_seqlen: int | None = None
) -> dict[str, Any]:
    """A batch of padding only (no targets): keeps ranks in lockstep when batches run out."""
    n = max(pad_to or 1, 1)
    step = min(pad_segment or n, n)
    seg = np.unique(np.concatenate([np.arange(0, n, step), [n]]))
    lens = np.diff(seg)
    return {
        "input_ids": torch.full((n,), pad_id, dtype=torch.long),
        "labels": torch.full((n,), IGNORE_INDEX, dtype=torch.long),
        "position_ids": torch.from_numpy(np.arange(n) - np.repeat(seg[:-1], lens)),
        "cu_seqlens": torch.from_numpy(seg.astype(np.int32)),
        "max_seqlen": max(int(lens.max()), max_seqlen or 0),
        "times": torch.zeros(n, dtype=torch.long),
        "n_tokens": 0,
    }
