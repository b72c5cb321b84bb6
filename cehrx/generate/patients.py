"""Sampled token sequences -> synthetic patients: validity, dates, birth dates (all vectorised).

A sample is its demographic prompt plus what the model generated. Turning it into a patient:

1. **Validity.** The whole sequence runs through the token grammar automaton
   (`cehrx.sampling.constraints.Grammar`, the tensor form of `check_sequence`), every
   sequence at once, one step per position. A trailing `[END]` is dropped (prepared sequences
   have none). A sample the grammar rejects is dropped (`grammar`). A sample cut by the token
   budget ends inside a visit: with `truncated="keep"` it is cut after its last complete visit
   (the record is censored, as real records are) and counted as repaired; without a complete
   visit it is dropped (`no_visits`).
2. **Dates.** The first visit starts on a day drawn uniformly inside the prompt's YEAR, at
   23:59:59 (the date-only convention of DESIGN §3, so the OMOP writer can write dates only
   and `prepare` reads back the same times). Every later time is that start plus the gap and
   inpatient time tokens before it (`cehrx.data.decode.rebuild_times`).
3. **Birth.** A midnight drawn uniformly among the days that give exactly the prompt's AGE
   at the first visit (so `shards.prompt_ids` recomputes the same prompt). A sample older than
   `max_age` at its last token is dropped (`impossible_age`).
4. **Copies.** Given the train records (`copies.TrainRecords`, `generate.drop_train_copies`), a
   patient whose kept token sequence is identical to one of them, as evaluate's exact-copy rate
   compares them, is dropped (`copy_of_train`).
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np
import pyarrow as pa

from cehrx.data.decode import rebuild_times
from cehrx.data.grammar import SECONDS_PER_DAY as DAY
from cehrx.data.grammar import int_value, value_of
from cehrx.data.shards import NO_BIRTH, SECONDS_PER_YEAR, TokenArrays, segment_cumsum
from cehrx.data.vocab import DEATH, END, KIND_ID, VE, VS, Vocab
from cehrx.generate.copies import TrainRecords
from cehrx.sampling.constraints import Grammar

END_OF_DAY = DAY - 1
DROP_REASONS = ("grammar", "no_visits", "unknown_year_or_age", "impossible_age", "copy_of_train")
TRUNCATED_KEY = "truncated_at_token_budget (cut after the last complete visit)"
# automaton states a complete patient may end in (after its last visit, or after death)
ACCEPT_STATES = Grammar.accept_states()


@dataclass
class Decoded:
    """The valid patients of a batch of samples, and what happened to the others."""

    arrays: TokenArrays  # full sequences (prompt included, no [END]) with times and birth
    sample_index: np.ndarray  # int64 [kept]: the sample each patient came from
    dropped: dict[str, int] = field(default_factory=dict)  # by DROP_REASONS
    repaired: dict[str, int] = field(default_factory=dict)


# ------------------------------------------------------------------------ flat-array helpers


def join_prompts(prompts: np.ndarray, gen_tokens: np.ndarray, gen_offsets: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Prepend each sample's `[4]` prompt row to its continuation: flat `(tokens, offsets)`."""
    prompts = np.asarray(prompts, dtype=np.int32)
    gen_offsets = np.asarray(gen_offsets, dtype=np.int64)
    n, p = prompts.shape
    glen = np.diff(gen_offsets)
    offsets = np.concatenate([[0], np.cumsum(glen + p)]).astype(np.int64)
    out = np.empty(int(offsets[-1]), dtype=np.int32)
    out[(offsets[:-1, None] + np.arange(p)).reshape(-1)] = prompts.reshape(-1)
    dest = np.repeat(offsets[:-1] + p - gen_offsets[:-1], glen) + np.arange(int(gen_offsets[-1]) if n else 0)
    out[dest] = np.asarray(gen_tokens, dtype=np.int32)[: len(dest)]
    return out, offsets


def take_prefixes(
    values: np.ndarray, offsets: np.ndarray, rows: np.ndarray, lengths: np.ndarray
) -> tuple[np.ndarray, np.ndarray]:
    """The first `lengths[k]` values of sequence `rows[k]`, for every k: flat `(values, offsets)`."""
    rows = np.asarray(rows, dtype=np.int64)
    lengths = np.asarray(lengths, dtype=np.int64)
    new_off = np.concatenate([[0], np.cumsum(lengths)]).astype(np.int64)
    src = np.repeat(offsets[:-1][rows] - new_off[:-1], lengths) + np.arange(int(new_off[-1]))
    return values[src], new_off


def last_position(flags: np.ndarray, offsets: np.ndarray) -> np.ndarray:
    """Per sequence, the index (within the sequence) of the last True flag, -1 when none."""
    n = len(offsets) - 1
    seq = np.repeat(np.arange(n), np.diff(offsets))
    pos = np.arange(len(flags)) - np.repeat(offsets[:-1], np.diff(offsets))
    out = np.full(n, -1, dtype=np.int64)
    hit = np.flatnonzero(flags)
    np.maximum.at(out, seq[hit], pos[hit])
    return out


def value_lookup(vocab: Vocab, kind: str) -> np.ndarray:
    """Per token id, the integer value of a `kind` token (`grammar.int_value`: YEAR//1998 -> 1998), -1 for
    others and UNKNOWN."""
    out = np.full(len(vocab), -1, dtype=np.int64)
    for i, t in enumerate(vocab.tokens):
        if (v := int_value(t, kind)) is not None:
            out[i] = v
    return out


# ------------------------------------------------------------------------ dates


def start_times(years: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    """Seconds since 1970 of a uniformly drawn day inside each year, at 23:59:59."""
    years = np.asarray(years, dtype=np.int64)
    first = (years - 1970).astype("datetime64[Y]").astype("datetime64[D]").astype(np.int64)
    last = (years - 1970 + 1).astype("datetime64[Y]").astype("datetime64[D]").astype(np.int64)
    day = first + (rng.random(len(years)) * (last - first)).astype(np.int64)
    return day * DAY + END_OF_DAY


def birth_times(starts: np.ndarray, ages: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    """A midnight per subject such that `floor((start - birth) / year) == age` (the AGE token's rule)."""
    starts = np.asarray(starts, dtype=np.int64)
    ages = np.asarray(ages, dtype=np.int64)
    lo = np.floor((starts - (ages + 1) * SECONDS_PER_YEAR) / DAY).astype(np.int64) + 1  # exclusive bound, whole days
    hi = np.floor((starts - ages * SECONDS_PER_YEAR) / DAY).astype(np.int64)
    day = lo + (rng.random(len(starts)) * (hi - lo + 1)).astype(np.int64)
    return np.minimum(day, hi) * DAY


# ------------------------------------------------------------------------ samples -> patients


def decode_samples(
    vocab: Vocab,
    prompts: np.ndarray,
    gen_tokens: np.ndarray,
    gen_offsets: np.ndarray,
    subject_ids: np.ndarray,
    seed: int,
    *,
    max_age: int = 120,
    truncated: str = "keep",
    grammar: Grammar | None = None,
    train: TrainRecords | None = None,
) -> Decoded:
    """Valid patients from `n` samples (`prompts[i]` + `gen_tokens[gen_offsets[i]:gen_offsets[i+1]]`).

    `subject_ids[i]` is the id sample i gets if kept. `train`: drop the patients identical to a train
    record (`copy_of_train`). Deterministic for a seed.
    """
    if truncated not in ("keep", "drop"):
        raise ValueError(f"truncated must be 'keep' or 'drop', got {truncated!r}")
    tokens, offsets = _drop_trailing_end(vocab, *join_prompts(prompts, gen_tokens, gen_offsets))
    reason = np.full(len(offsets) - 1, -1, dtype=np.int64)  # index into DROP_REASONS; -1: kept
    cut, lengths = _check_validity(vocab, grammar or Grammar.build(vocab), tokens, offsets, truncated, reason)
    times, birth = _dates(vocab, tokens, offsets, lengths, seed, max_age, reason)
    if train is not None:
        _mark_copies(train, tokens, offsets, lengths, reason)
    keep = np.flatnonzero(reason < 0)
    kept_tokens, kept_offsets = take_prefixes(tokens, offsets, keep, lengths[keep])
    kept_times, _ = take_prefixes(times, offsets, keep, lengths[keep])
    arrays = TokenArrays(
        subject_id=np.asarray(subject_ids, dtype=np.int64)[keep],
        offsets=kept_offsets,
        tokens=kept_tokens.astype(np.int32),
        times=kept_times.astype(np.int64),
        birth_time=birth[keep].astype(np.int64),
    )
    dropped = {r: int((reason == i).sum()) for i, r in enumerate(DROP_REASONS)}
    return Decoded(arrays, keep.astype(np.int64), dropped, {TRUNCATED_KEY: int((cut & (reason < 0)).sum())})


def _drop_trailing_end(vocab: Vocab, tokens: np.ndarray, offsets: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """The sequences without a final `[END]` (prepared sequences have none)."""
    n = len(offsets) - 1
    lengths = np.diff(offsets)
    ends_with_end = np.zeros(n, dtype=bool)
    nonempty = lengths > 0
    ends_with_end[nonempty] = tokens[offsets[1:][nonempty] - 1] == vocab[END]
    return take_prefixes(tokens, offsets, np.arange(n), lengths - ends_with_end)


def _check_validity(
    vocab: Vocab, grammar: Grammar, tokens: np.ndarray, offsets: np.ndarray, truncated: str, reason: np.ndarray
) -> tuple[np.ndarray, np.ndarray]:
    """Run the grammar over every sequence; mark `grammar` / `no_visits` drops in `reason`.

    Returns which sequences are cut after their last complete visit (unfinished, `truncated="keep"`)
    and every sequence's length to keep."""
    state = grammar.prompt_states(tokens, offsets)
    accepted = np.isin(state, ACCEPT_STATES)
    rejected = grammar.is_free(state)
    last_ve = last_position(tokens == vocab[VE], offsets)
    unfinished = ~accepted & ~rejected
    cut = unfinished & (last_ve >= 0) & (truncated == "keep")
    lengths = np.where(cut, last_ve + 1, np.diff(offsets))
    reason[rejected] = 0
    reason[(reason < 0) & unfinished & ~cut] = 1
    return cut, lengths


def _dates(
    vocab: Vocab,
    tokens: np.ndarray,
    offsets: np.ndarray,
    lengths: np.ndarray,
    seed: int,
    max_age: int,
    reason: np.ndarray,
) -> tuple[np.ndarray, np.ndarray]:
    """Every token's time and each sequence's birth, drawn from the prompt's YEAR and AGE; marks
    `unknown_year_or_age` and `impossible_age` (older than `max_age` at the last kept token) in `reason`."""
    years = value_lookup(vocab, "year")[tokens[offsets[:-1]]]
    ages = value_lookup(vocab, "age")[tokens[offsets[:-1] + 1]]
    reason[(reason < 0) & ((years < 0) | (ages < 0))] = 2
    rng = np.random.default_rng(np.random.SeedSequence([int(seed), 7]))
    start = start_times(np.where(years < 0, 1970, years), rng)
    birth = birth_times(start, np.maximum(ages, 0), rng)
    times = rebuild_times(vocab, tokens, offsets, start)
    last_time = times[np.maximum(offsets[:-1] + lengths - 1, 0)]
    too_old = np.floor((last_time - birth) / SECONDS_PER_YEAR) > max_age
    reason[(reason < 0) & too_old] = 3
    return times, birth


def _mark_copies(
    train: TrainRecords, tokens: np.ndarray, offsets: np.ndarray, lengths: np.ndarray, reason: np.ndarray
) -> None:
    """Mark `copy_of_train` in `reason`: a still valid sequence whose kept prefix is a train record."""
    rows = np.flatnonzero(reason < 0)
    kept, kept_offsets = take_prefixes(tokens, offsets, rows, lengths[rows])
    reason[rows[train.contains(kept, kept_offsets)]] = DROP_REASONS.index("copy_of_train")


# ------------------------------------------------------------------------ tables for the writers


def visit_table(vocab: Vocab, arrays: TokenArrays) -> pa.Table:
    """One row per visit: `subject_id, visit (1-based per subject), vtype, start, end, discharge`.

    `start`/`end` are the times (s) of `[VS]` and `[VE]`; `discharge` the source code of the
    visit's DISCHARGE token (null when none). Sequences must be valid (one `[VE]` per `[VS]`).
    """
    tok = arrays.tokens
    names = np.asarray(vocab.tokens, dtype=object)
    vs = np.flatnonzero(tok == vocab[VS])
    ve = np.flatnonzero(tok == vocab[VE])
    if len(vs) != len(ve):
        raise ValueError(f"{len(vs)} [VS] but {len(ve)} [VE]: visit_table needs valid sequences")
    seq = np.repeat(np.arange(len(arrays)), arrays.lengths())
    global_visit = np.cumsum(tok == vocab[VS]) - 1
    visit_no = segment_cumsum(tok == vocab[VS], arrays.offsets)
    kinds = vocab.kind_array()[tok]
    dis = np.flatnonzero(kinds == KIND_ID["discharge"])
    discharge = np.full(len(vs), None, dtype=object)
    discharge[global_visit[dis]] = np.array([value_of(s) for s in names[tok[dis]]], dtype=object)
    vtype = np.array([value_of(s) for s in names[tok[vs + 1]]], dtype=object)
    return pa.table(
        {
            "subject_id": pa.array(arrays.subject_id[seq[vs]], type=pa.int64()),
            "visit": pa.array(visit_no[vs], type=pa.int64()),
            "vtype": pa.array(vtype.tolist(), type=pa.string()),
            "vtoken": pa.array(names[tok[vs + 1]].tolist(), type=pa.string()),
            "start": pa.array(arrays.times[vs], type=pa.int64()),
            "end": pa.array(arrays.times[ve], type=pa.int64()),
            "discharge": pa.array(discharge.tolist(), type=pa.string()),
        }
    )


def person_table(vocab: Vocab, arrays: TokenArrays) -> pa.Table:
    """One row per patient: `subject_id, birth, gender, race` (tokens) and `death` (s, null when alive)."""
    names = np.asarray(vocab.tokens, dtype=object)
    first = arrays.offsets[:-1]
    death = np.full(len(arrays), NO_BIRTH, dtype=np.int64)
    d = np.flatnonzero(arrays.tokens == vocab[DEATH])
    seq = np.repeat(np.arange(len(arrays)), arrays.lengths())
    death[seq[d]] = arrays.times[d]
    return pa.table(
        {
            "subject_id": pa.array(arrays.subject_id, type=pa.int64()),
            "birth": pa.array(arrays.birth_time, type=pa.int64()),
            "first_time": pa.array(arrays.times[first], type=pa.int64()),
            "last_time": pa.array(arrays.times[arrays.offsets[1:] - 1], type=pa.int64()),
            "gender": pa.array(names[arrays.tokens[first + 2]].tolist(), type=pa.string()),
            "race": pa.array(names[arrays.tokens[first + 3]].tolist(), type=pa.string()),
            "death": pa.array(death, type=pa.int64(), mask=death == NO_BIRTH),
        }
    )
