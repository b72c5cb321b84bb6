"""Token sequences -> MEDS events (vectorised), and times rebuilt from time tokens.

Generation samples token ids only; `rebuild_times` gives them dates from the prompt's start
and the gap / inpatient-time tokens, and `decode_events` turns any sequences (generated or
prepared) into MEDS rows: codes with values sampled inside their decile, visits, discharge,
death, and the demographic statics.
"""

from __future__ import annotations

import numpy as np
import pyarrow as pa

from cehrx.data.grammar import PREFIX
from cehrx.data.shards import NO_BIRTH, SECONDS_PER_YEAR
from cehrx.data.vocab import KINDS, Vocab, time_token_days

_KIND = {k: i for i, k in enumerate(KINDS)}


def token_seconds(vocab: Vocab) -> np.ndarray:
    """Seconds each token id advances the clock (0 for non-time tokens)."""
    days = [time_token_days(t) or 0.0 for t in vocab.tokens]
    return np.round(np.asarray(days) * 86400).astype(np.int64)


def rebuild_times(vocab: Vocab, tokens: np.ndarray, offsets: np.ndarray, start_times: np.ndarray) -> np.ndarray:
    """Per-token times from each sequence's start time plus the time tokens before it.

    A time token's own time already includes its step (it carries the start of what follows).
    """
    tokens = np.asarray(tokens)
    steps = token_seconds(vocab)[tokens]
    seq = np.repeat(np.arange(len(offsets) - 1), np.diff(offsets))
    csum = np.cumsum(steps)
    base = np.concatenate([[0], csum])[offsets[:-1]]  # cumulative steps before each sequence
    return np.asarray(start_times, dtype=np.int64)[seq] + csum - base[seq]


def decode_events(
    vocab: Vocab,
    subject_ids: np.ndarray,
    offsets: np.ndarray,
    tokens: np.ndarray,
    times: np.ndarray,
    birth_times: np.ndarray | None = None,
    seed: int = 0,
) -> pa.Table:
    """MEDS rows (`subject_id, time, code, numeric_value` + `visit_id`) for flat token sequences.

    `visit_id` numbers the visits of each subject from 1 (0 = outside a visit). A visit yields
    one `VISIT//<type>` row at its start; `[DEATH]` gives `MEDS_DEATH`; GENDER/RACE give static
    rows; a known birth gives `MEDS_BIRTH`.
    """
    tokens = np.asarray(tokens, dtype=np.int64)
    times = np.asarray(times, dtype=np.int64)
    n_seq = len(offsets) - 1
    seq = np.repeat(np.arange(n_seq), np.diff(offsets))
    kinds = vocab.kind_array()[tokens]
    names = np.asarray(vocab.tokens, dtype=object)
    is_vs = tokens == vocab["[VS]"]
    visit = _per_sequence_cumsum(is_vs, offsets)

    keep = np.isin(kinds, [_KIND["code"], _KIND["visit"], _KIND["discharge"]]) | (tokens == vocab["[DEATH]"])
    idx = np.flatnonzero(keep)
    codes = names[tokens[idx]].copy()
    codes[tokens[idx] == vocab["[DEATH]"]] = "MEDS_DEATH"
    dis = kinds[idx] == _KIND["discharge"]
    codes[dis] = np.array([c[len(PREFIX["discharge"]) :] for c in codes[dis]], dtype=object)
    values = _values(vocab, tokens, kinds, idx, seed)

    static_idx = np.flatnonzero(np.isin(kinds, [_KIND["gender"], _KIND["race"]]))
    parts = [
        (
            seq[static_idx],
            np.full(len(static_idx), np.iinfo(np.int64).min),
            names[tokens[static_idx]],
            np.full(len(static_idx), np.nan),
            np.zeros(len(static_idx), np.int64),
        ),
        (seq[idx], times[idx], codes, values, visit[idx]),
    ]
    if birth_times is not None:
        b = np.asarray(birth_times, dtype=np.int64)
        known = np.flatnonzero(b != NO_BIRTH)
        parts.insert(
            0,
            (
                known,
                b[known],
                np.full(len(known), "MEDS_BIRTH", dtype=object),
                np.full(len(known), np.nan),
                np.zeros(len(known), np.int64),
            ),
        )
    s, t, c, v, vid = (np.concatenate(x) for x in zip(*parts))
    order = np.lexsort((vid, t, s))
    t = t[order]
    time_col = pa.array(
        np.where(t == np.iinfo(np.int64).min, 0, t).astype("datetime64[s]").astype("datetime64[us]"),
        mask=t == np.iinfo(np.int64).min,
    )
    return pa.table(
        {
            "subject_id": pa.array(np.asarray(subject_ids, dtype=np.int64)[s[order]]),
            "time": time_col,
            "code": pa.array(c[order].tolist(), type=pa.string()),
            "numeric_value": pa.array(v[order].astype(np.float32), mask=np.isnan(v[order])),
            "visit_id": pa.array(vid[order]),
        }
    )


def _per_sequence_cumsum(flags: np.ndarray, offsets: np.ndarray) -> np.ndarray:
    c = np.cumsum(flags.astype(np.int64))
    before = np.concatenate([[0], c])[offsets[:-1]]
    return c - np.repeat(before, np.diff(offsets))


def edge_matrix(vocab: Vocab) -> np.ndarray:
    """`[vocab_size, num_bins + 1]` value edges per token id (NaN where a code has none)."""
    width = max((len(e) for e in vocab.edges.values()), default=2)
    m = np.full((len(vocab), width), np.nan)
    for code, e in vocab.edges.items():
        if code in vocab:
            m[vocab[code], : len(e)] = e
    return m


def _values(vocab: Vocab, tokens: np.ndarray, kinds: np.ndarray, idx: np.ndarray, seed: int) -> np.ndarray:
    """Values for code tokens followed by Q<k>: uniform inside the decile's observed range."""
    values = np.full(len(idx), np.nan)
    nxt = np.minimum(idx + 1, len(tokens) - 1)
    has_q = (kinds[nxt] == _KIND["quantile"]) & (nxt != idx)
    if not has_q.any() or not vocab.edges:
        return values
    q_of = np.zeros(len(vocab), dtype=np.int64)
    q_ids = vocab.ids_of_kind("quantile")
    q_of[q_ids] = [int(vocab.tokens[i][1:]) for i in q_ids]
    edges = edge_matrix(vocab)
    j = np.flatnonzero(has_q)
    k = np.clip(q_of[tokens[nxt[j]]], 1, edges.shape[1] - 1)
    lo, hi = edges[tokens[idx[j]], k - 1], edges[tokens[idx[j]], k]
    u = np.random.default_rng(seed).uniform(size=len(j))
    values[j] = lo + u * (hi - lo)
    return values


def age_years(start_time: int, birth_time: int) -> int:
    """Whole years between birth and start, as the prompt's AGE token counts them.

    >>> age_years(int(SECONDS_PER_YEAR * 40.5), 0)
    40
    """
    return int(np.floor((start_time - birth_time) / SECONDS_PER_YEAR))
