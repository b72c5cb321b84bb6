"""Generated patients that are verbatim copies of a training record (`generate.drop_train_copies`).

A copy is what evaluate's exact-copy rate counts (`eval.privacy.exact_copy_rate`, `rate_full_sequence`):
the whole token sequence (prompt included, `[END]` removed) identical to a record of the prepared dir's
train split, compared by `data.hashing.sequence_hashes` (skip 0) in evaluate's token space, where a real
token keeps its id in the prepared vocab and a token only the model's vocab has gets an id after them
(`eval.patients.TokenSpace.from_vocabs(real, model)`). Times are not compared: a copy with other dates is
still a copy. The train split is hashed once per run, shard by shard from the token column: memory holds
one uint64 per train record and one batch of tokens.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq

from cehrx.data.hashing import sequence_hashes
from cehrx.data.shards import shard_paths, without_token
from cehrx.data.vocab import END, Vocab

__all__ = ["TrainRecords", "space_ids"]


def space_ids(real: Vocab, vocab: Vocab) -> np.ndarray:
    """`vocab`'s ids in evaluate's token space of (`real`, `vocab`): a token of `real` gets its id there,
    one that `real` lacks `len(real)` + its rank among those (the union order of `TokenSpace.from_vocabs`)."""
    index = {t: i for i, t in enumerate(real.tokens)}
    out = np.empty(len(vocab), dtype=np.int64)
    extra = len(real)
    for i, t in enumerate(vocab.tokens):
        if t in index:
            out[i] = index[t]
        else:
            index[t] = out[i] = extra
            extra += 1
    return out


@dataclass
class TrainRecords:
    """The fingerprints of a prepared dir's train records, and the test of a generated sequence against them."""

    hashes: np.ndarray  # uint64, sorted unique: one per distinct train record
    ids: np.ndarray  # int64 [len(model vocab)]: model token id -> evaluate's token space
    end_id: int  # [END] in that space (-1: none)
    n_records: int

    @classmethod
    def load(cls, prepared: str | Path, vocab: Vocab, batch_rows: int = 1024) -> "TrainRecords":
        """Hash every train record of `prepared` (ids of its own vocab.json, which come first in the space)."""
        real = Vocab.load(prepared)
        ids = space_ids(real, vocab)
        end_id = real[END] if END in real else -1
        parts, n = [], 0
        for path in shard_paths(prepared, "train"):
            for batch in pq.ParquetFile(path).iter_batches(batch_size=batch_rows, columns=["tokens"]):
                col = batch.column(0)
                offsets = np.asarray(col.offsets, dtype=np.int64)
                tokens = np.asarray(col.values, dtype=np.int64)[offsets[0] : offsets[-1]]
                offsets = offsets - offsets[0]
                parts.append(sequence_hashes(*without_token(tokens, offsets, end_id)))
                n += len(offsets) - 1
        hashes = np.unique(np.concatenate(parts)) if parts else np.zeros(0, dtype=np.uint64)
        return cls(hashes=hashes, ids=ids, end_id=int(ids[vocab[END]]) if END in vocab else end_id, n_records=n)

    def contains(self, tokens: np.ndarray, offsets: np.ndarray) -> np.ndarray:
        """bool per flat sequence (model vocab ids, prompt included): identical to a train record."""
        mapped = self.ids[np.asarray(tokens, dtype=np.int64)]
        h = sequence_hashes(*without_token(mapped, np.asarray(offsets, dtype=np.int64), self.end_id))
        return np.isin(h, self.hashes, assume_unique=False)
