"""Token shards: the on-disk contract between `prepare` and every model task.

`<prepared_dir>/tokens/<split>/<n>.parquet`, one row per subject, ordered by subject_id:

| column       | type          | meaning                                                         |
|--------------|---------------|-----------------------------------------------------------------|
| subject_id   | int64         | MEDS subject_id (OMOP person_id)                                |
| tokens       | list<int32>   | token ids into `vocab.json`, grammar of DESIGN §4, no [END]     |
| times        | list<int64>   | per-token time, seconds since 1970 (UTC), non-decreasing        |
| birth_time   | int64 (null)  | birth, seconds since 1970; null when unknown or implausible     |
| n_tokens     | int32         | len(tokens)                                                     |

The first `PROMPT_LEN` tokens are the demographic prompt (YEAR, AGE, GENDER, RACE). Every
token's time is the earliest moment it is known, so cutting a sequence at a prediction time
`t` is `tokens[times <= t]` (a prefix): gap tokens carry the start of the visit they lead to,
`[VE]` and discharge the visit end, date-only events 23:59:59 of their day.

Loading concatenates a split into flat numpy arrays (`TokenArrays`): no per-subject Python
objects, and the arrays can be saved as `.npy` and memory-mapped by data loaders.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from cehrx.data.grammar import PROMPT_KINDS, UNKNOWN, int_value, prompt_token
from cehrx.data.grammar import PROMPT_LEN as PROMPT_LEN  # re-exported: part of the shard contract
from cehrx.data.grammar import SECONDS_PER_YEAR as SECONDS_PER_YEAR  # re-exported: ages are in these years
from cehrx.data.vocab import Vocab

SPLITS = ("train", "tuning", "held_out")

SHARD_SCHEMA = pa.schema(
    [
        ("subject_id", pa.int64()),
        ("tokens", pa.list_(pa.int32())),
        ("times", pa.list_(pa.int64())),
        ("birth_time", pa.int64()),
        ("n_tokens", pa.int32()),
    ]
)


@dataclass
class TokenArrays:
    """A split as flat arrays: subject i owns `tokens[offsets[i]:offsets[i+1]]`."""

    subject_id: np.ndarray  # int64 [n]
    offsets: np.ndarray  # int64 [n+1]
    tokens: np.ndarray  # int32 [total]
    times: np.ndarray  # int64 [total]
    birth_time: np.ndarray  # int64 [n], INT64_MIN when unknown

    def __len__(self) -> int:
        return len(self.subject_id)

    def lengths(self) -> np.ndarray:
        return np.diff(self.offsets)

    def subject(self, i: int) -> tuple[np.ndarray, np.ndarray]:
        a, b = self.offsets[i], self.offsets[i + 1]
        return self.tokens[a:b], self.times[a:b]

    def save(self, directory: str | Path) -> None:
        directory = Path(directory)
        directory.mkdir(parents=True, exist_ok=True)
        for name in ("subject_id", "offsets", "tokens", "times", "birth_time"):
            np.save(directory / f"{name}.npy", getattr(self, name))

    @classmethod
    def load_npy(cls, directory: str | Path, mmap: bool = True) -> "TokenArrays":
        mode = "r" if mmap else None
        d = Path(directory)
        return cls(
            **{
                n: np.load(d / f"{n}.npy", mmap_mode=mode)
                for n in ("subject_id", "offsets", "tokens", "times", "birth_time")
            }
        )


NO_BIRTH = np.iinfo(np.int64).min


def segment_cumsum(values: np.ndarray, offsets: np.ndarray) -> np.ndarray:
    """Inclusive running sum of `values` restarting at each sequence of a flat `offsets` layout.

    Flags count as 1: `segment_cumsum(tokens == [VS], offsets)` numbers each subject's visits
    from 1 (0 before the first); over time-token steps it is the time since each sequence's start.

    >>> segment_cumsum(np.array([1, 0, 1, 1, 1]), np.array([0, 3, 5])).tolist()
    [1, 1, 2, 1, 2]
    """
    c = np.cumsum(values)
    before = np.concatenate([[0], c])[offsets[:-1]]
    return c - np.repeat(before, np.diff(offsets))


def without_token(tokens: np.ndarray, offsets: np.ndarray, token_id: int) -> tuple[np.ndarray, np.ndarray]:
    """Flat sequences with every `token_id` removed (e.g. `[END]`: a generator may keep the stop token,
    prepared shards have none); unchanged when `token_id < 0` or absent.

    >>> [a.tolist() for a in without_token(np.array([5, 1, 5, 2, 1]), np.array([0, 3, 5]), 1)]
    [[5, 5, 2], [0, 2, 3]]
    """
    if token_id < 0 or not (tokens == token_id).any():
        return tokens, offsets
    keep = tokens != token_id
    seq = np.repeat(np.arange(len(offsets) - 1), np.diff(offsets))
    counts = np.bincount(seq[keep], minlength=len(offsets) - 1)
    return tokens[keep], np.concatenate([[0], np.cumsum(counts)]).astype(np.int64)


def shard_paths(prepared_dir: str | Path, split: str) -> list[Path]:
    d = Path(prepared_dir) / "tokens" / split
    if not d.is_dir():
        raise FileNotFoundError(f"no token shards for split {split!r} at {d} (run `cehrx task=prepare` first)")
    return sorted(d.glob("*.parquet"), key=lambda p: (len(p.stem), p.stem))


def read_split_table(prepared_dir: str | Path, split: str, columns: list[str] | None = None) -> pa.Table:
    paths = shard_paths(prepared_dir, split)
    if not paths:
        return SHARD_SCHEMA.empty_table()
    return pa.concat_tables([pq.read_table(p, columns=columns) for p in paths])


def load_split(prepared_dir: str | Path, split: str) -> TokenArrays:
    """Read a split's shards into flat arrays (list columns flattened without Python objects)."""
    return arrays_from_table(read_split_table(prepared_dir, split))


def load_shard(path: str | Path) -> TokenArrays:
    """One token shard file as flat arrays."""
    return arrays_from_table(pq.read_table(path))


def arrays_from_table(table: pa.Table) -> TokenArrays:
    """A table of `SHARD_SCHEMA` rows as flat arrays."""
    tok = table.column("tokens").combine_chunks()
    tim = table.column("times").combine_chunks()
    offsets = np.asarray(tok.offsets, dtype=np.int64)
    offsets = offsets - offsets[0]
    birth = table.column("birth_time").to_numpy(zero_copy_only=False)
    birth = (
        np.where(np.isnan(birth.astype(float)), NO_BIRTH, birth).astype(np.int64) if birth.dtype != np.int64 else birth
    )
    return TokenArrays(
        subject_id=table.column("subject_id").to_numpy().astype(np.int64),
        offsets=offsets,
        tokens=np.asarray(tok.flatten(), dtype=np.int32),
        times=np.asarray(tim.flatten(), dtype=np.int64),
        birth_time=birth,
    )


def table_from_arrays(arrays: TokenArrays) -> pa.Table:
    """Flat arrays as a table of `SHARD_SCHEMA` rows (the inverse of `arrays_from_table`)."""
    offsets = pa.array(arrays.offsets.astype(np.int32))
    birth = np.asarray(arrays.birth_time)
    return pa.Table.from_arrays(
        [
            pa.array(arrays.subject_id, type=pa.int64()),
            pa.ListArray.from_arrays(offsets, pa.array(arrays.tokens, type=pa.int32())),
            pa.ListArray.from_arrays(offsets, pa.array(arrays.times, type=pa.int64())),
            pa.array(birth, type=pa.int64(), mask=birth == NO_BIRTH),
            pa.array(arrays.lengths().astype(np.int32), type=pa.int32()),
        ],
        schema=SHARD_SCHEMA,
    )


ARRAY_NAMES = ("subject_id", "offsets", "tokens", "times", "birth_time")


def save_split(prepared_dir: str | Path, split: str, directory: str | Path, batch_rows: int = 1024) -> TokenArrays:
    """A split's shards as the `.npy` files of `TokenArrays.save`, streamed: memory holds `batch_rows`
    subjects at a time, whatever the split's size. The sizes come first from the `n_tokens` column; then
    each batch is flattened into its place in memory-mapped files. Returns the arrays, memory-mapped."""
    d = Path(directory)
    d.mkdir(parents=True, exist_ok=True)
    paths = shard_paths(prepared_dir, split)
    lengths = [pq.read_table(p, columns=["n_tokens"]).column(0).to_numpy().astype(np.int64) for p in paths]
    lengths = np.concatenate(lengths) if lengths else np.zeros(0, np.int64)
    offsets = np.concatenate([[0], np.cumsum(lengths)]).astype(np.int64)
    n, total = len(lengths), int(offsets[-1])
    out = {
        "subject_id": np.lib.format.open_memmap(d / "subject_id.npy", "w+", np.int64, (n,)),
        "tokens": np.lib.format.open_memmap(d / "tokens.npy", "w+", np.int32, (total,)),
        "times": np.lib.format.open_memmap(d / "times.npy", "w+", np.int64, (total,)),
        "birth_time": np.lib.format.open_memmap(d / "birth_time.npy", "w+", np.int64, (n,)),
    }
    np.save(d / "offsets.npy", offsets)
    row = 0
    for p in paths:
        for batch in pq.ParquetFile(p).iter_batches(batch_size=batch_rows, columns=list(SHARD_SCHEMA.names)):
            part = arrays_from_table(pa.Table.from_batches([batch]))
            a, b = row, row + len(part)
            out["subject_id"][a:b], out["birth_time"][a:b] = part.subject_id, part.birth_time
            out["tokens"][offsets[a] : offsets[b]], out["times"][offsets[a] : offsets[b]] = part.tokens, part.times
            row = b
    for m in out.values():
        m.flush()
    del out
    return TokenArrays.load_npy(d)


def prompt_ids(vocab: Vocab, start_times: np.ndarray, birth_times: np.ndarray, prompts: np.ndarray) -> np.ndarray:
    """The demographic prompts `prompts` (`[n, 4]`: YEAR, AGE, GENDER, RACE) moved to `start_times`.

    Used when a training crop, a history or a generation window starts at a later visit: the year
    and age are recomputed for that start, gender and race kept. Years outside the vocabulary are
    clamped to its range; an unknown birth gives `AGE//UNKNOWN`. Returns int32 `[n, 4]`.
    """
    start_times = np.asarray(start_times, dtype=np.int64)
    years = start_times.astype("datetime64[s]").astype("datetime64[Y]").astype(np.int64) + 1970
    year_ids = _clamped_ids(vocab, "year", years)
    birth_times = np.asarray(birth_times, dtype=np.int64)
    known = birth_times != NO_BIRTH
    ages = np.where(known, np.floor((start_times - np.where(known, birth_times, 0)) / SECONDS_PER_YEAR), 0).astype(
        np.int64
    )
    age_ids = _clamped_ids(vocab, "age", np.maximum(ages, 0))
    age_ids = np.where(known, age_ids, vocab.id(prompt_token("age", UNKNOWN)))
    prompts = np.asarray(prompts).reshape(-1, PROMPT_LEN)
    gender, race = (prompts[:, PROMPT_KINDS.index(k)] for k in ("gender", "race"))
    return np.stack([year_ids, age_ids, gender, race], axis=1).astype(np.int32)


def first_visit_in(visit_starts: np.ndarray, lo: np.ndarray, hi: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Where a crop may start: per row, the index `k` into `visit_starts` (the sorted positions of
    every `[VS]`) of the first at or after `lo`, and whether it lies before `hi`.

    The one search behind every visit-aligned crop (`packing.crop_starts`, `history._window_starts`,
    `generate/windows._next_windows`); which span each searches, and what it does when no visit is
    found, is theirs (see their docstrings).

    >>> first_visit_in(np.array([4, 9, 20]), np.array([0, 5, 10, 21]), np.array([4, 30, 20, 40]))
    (array([0, 1, 2, 3]), array([False,  True, False, False]))
    """
    k = np.searchsorted(visit_starts, lo)
    if not len(visit_starts):
        return k, np.zeros(np.shape(k), dtype=bool)
    return k, (k < len(visit_starts)) & (visit_starts[np.minimum(k, len(visit_starts) - 1)] < hi)


def _clamped_ids(vocab: Vocab, kind: str, values: np.ndarray) -> np.ndarray:
    """Map integer values to the ids of `kind` tokens (`YEAR//<value>`), clamping to the values the vocab has."""
    have = sorted(v for t in vocab.tokens if (v := int_value(t, kind)) is not None)
    unknown = vocab.id(prompt_token(kind, UNKNOWN))
    if not have:
        return np.full(len(values), unknown, dtype=np.int64)
    lo, hi = have[0], have[-1]
    table = np.full(hi - lo + 1, unknown, dtype=np.int64)
    for v in have:
        table[v - lo] = vocab[prompt_token(kind, v)]
    return table[np.clip(values, lo, hi) - lo]
