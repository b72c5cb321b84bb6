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
from cehrx.data.shards import NO_BIRTH, SECONDS_PER_YEAR, segment_cumsum
from cehrx.data.vocab import KIND_ID, Vocab, time_token_days


def token_seconds(vocab: Vocab) -> np.ndarray:
    """Seconds each token id advances the clock (0 for non-time tokens)."""
    days = [time_token_days(t) or 0.0 for t in vocab.tokens]
    return np.round(np.asarray(days) * 86400).astype(np.int64)


def rebuild_times(vocab: Vocab, tokens: np.ndarray, offsets: np.ndarray, start_times: np.ndarray) -> np.ndarray:
    """Per-token times from each sequence's start time plus the time tokens before it.

    A time token's own time already includes its step (it carries the start of what follows).
    """
    steps = token_seconds(vocab)[np.asarray(tokens)]
    seq = np.repeat(np.arange(len(offsets) - 1), np.diff(offsets))
    return np.asarray(start_times, dtype=np.int64)[seq] + segment_cumsum(steps, offsets)


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
    seq = np.repeat(np.arange(len(offsets) - 1), np.diff(offsets))
    kinds = vocab.kind_array()[tokens]
    names = np.asarray(vocab.tokens, dtype=object)
    parts = [
        _static_rows(kinds, tokens, names, seq),
        _event_rows(vocab, tokens, times, kinds, names, seq, offsets, seed),
    ]
    if birth_times is not None:
        parts.insert(0, _birth_rows(np.asarray(birth_times, dtype=np.int64)))
    return _rows_table(parts, subject_ids)


# a block of rows: (sequence index, time (s, NO_TIME for statics), code, value (NaN: none), visit_id)
_Rows = tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray, np.ndarray]
NO_TIME = np.iinfo(np.int64).min


def _event_rows(
    vocab: Vocab,
    tokens: np.ndarray,
    times: np.ndarray,
    kinds: np.ndarray,
    names: np.ndarray,
    seq: np.ndarray,
    offsets: np.ndarray,
    seed: int,
) -> _Rows:
    """Code, visit, discharge and `[DEATH]` tokens as timed rows, with values and the visit they fall in."""
    visit = segment_cumsum(tokens == vocab["[VS]"], offsets)
    keep = np.isin(kinds, [KIND_ID["code"], KIND_ID["visit"], KIND_ID["discharge"]]) | (tokens == vocab["[DEATH]"])
    idx = np.flatnonzero(keep)
    codes = names[tokens[idx]].copy()
    codes[tokens[idx] == vocab["[DEATH]"]] = "MEDS_DEATH"
    dis = kinds[idx] == KIND_ID["discharge"]
    codes[dis] = np.array([c[len(PREFIX["discharge"]) :] for c in codes[dis]], dtype=object)
    return seq[idx], times[idx], codes, _values(vocab, tokens, kinds, idx, seed), visit[idx]


def _static_rows(kinds: np.ndarray, tokens: np.ndarray, names: np.ndarray, seq: np.ndarray) -> _Rows:
    """GENDER and RACE tokens as static rows (null time, outside any visit)."""
    i = np.flatnonzero(np.isin(kinds, [KIND_ID["gender"], KIND_ID["race"]]))
    return seq[i], np.full(len(i), NO_TIME), names[tokens[i]], np.full(len(i), np.nan), np.zeros(len(i), np.int64)


def _birth_rows(birth: np.ndarray) -> _Rows:
    """`MEDS_BIRTH` at each known birth time (sequence i's row for `birth[i]`)."""
    known = np.flatnonzero(birth != NO_BIRTH)
    n = len(known)
    return known, birth[known], np.full(n, "MEDS_BIRTH", dtype=object), np.full(n, np.nan), np.zeros(n, np.int64)


def _rows_table(parts: list[_Rows], subject_ids: np.ndarray) -> pa.Table:
    """The blocks as one MEDS table, ordered by subject, time (statics first), visit."""
    s, t, c, v, vid = (np.concatenate(x) for x in zip(*parts))
    order = np.lexsort((vid, t, s))
    t = t[order]
    time_col = pa.array(
        np.where(t == NO_TIME, 0, t).astype("datetime64[s]").astype("datetime64[us]"),
        mask=t == NO_TIME,
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
    has_q = (kinds[nxt] == KIND_ID["quantile"]) & (nxt != idx)
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
