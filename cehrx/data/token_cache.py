"""The token cache: a split's parquet shards flattened once into memory-mapped `.npy` arrays.

Why: every process, DataLoader worker and rank of a pretraining run reads the same tokens; a
million patients as Python objects would be copied into each of them, a few flat arrays are
memory-mapped once. On first use each split is flattened into `<prepared_dir>/cache/<split>/`
(the `TokenArrays` arrays plus the positions of every `[VS]`, for visit-aligned crops), written
to a temporary name and renamed (`atomic.build_shared_dir`), and rebuilt when a shard or `vocab.json`
is newer.
"""

from __future__ import annotations

import json
import logging
from pathlib import Path

import numpy as np

from cehrx.data import shards
from cehrx.data.atomic import build_shared_dir
from cehrx.data.vocab import VS, Vocab

log = logging.getLogger("cehrx.datamodule")

CACHE_FORMAT = "cehrx.token_cache/1"
_CACHE_META = "meta.json"


def _newest_input_mtime(prepared_dir: Path, split: str) -> float:
    paths = shards.shard_paths(prepared_dir, split) + [prepared_dir / "vocab.json"]
    return max(p.stat().st_mtime for p in paths if p.exists())


def cache_is_fresh(prepared_dir: str | Path, split: str, cache_dir: str | Path) -> bool:
    """True when `cache_dir/<split>` was built by this format after every shard and the vocab."""
    return _is_fresh(Path(prepared_dir), split, Path(cache_dir) / split)


def _is_fresh(prepared_dir: Path, split: str, directory: Path) -> bool:
    meta = directory / _CACHE_META
    if not meta.is_file():
        return False
    try:
        ok = json.loads(meta.read_text()).get("format") == CACHE_FORMAT
    except (OSError, ValueError):
        return False
    return ok and meta.stat().st_mtime >= _newest_input_mtime(prepared_dir, split)


def build_cache(prepared_dir: str | Path, split: str, cache_dir: str | Path, vocab: Vocab) -> Path:
    """Flatten a split's shards into `.npy` arrays (+ `[VS]` positions) under `cache_dir/<split>`.

    Streamed shard file by shard file (`shards.save_split`), so memory stays bounded whatever the
    split's size. Built with `atomic.build_shared_dir`: ranks and nodes that build the same cache at
    once never break each other's (the first finished wins, the others discard theirs), and a crash
    never leaves a half-written cache that looks complete. Returns the split's cache directory.
    """
    prepared_dir, cache_dir = Path(prepared_dir), Path(cache_dir)
    target = cache_dir / split
    meta: dict = {}

    def build(tmp: Path) -> None:
        arrays = shards.save_split(prepared_dir, split, tmp)  # streamed: a batch of subjects in memory at a time
        save_visit_starts(arrays.tokens, vocab[VS], tmp / "visit_starts.npy")
        meta.update(format=CACHE_FORMAT, split=split, subjects=len(arrays), tokens=int(len(arrays.tokens)))
        (tmp / _CACHE_META).write_text(json.dumps(meta) + "\n")  # last: what `_is_fresh` looks for

    if build_shared_dir(target, lambda d: _is_fresh(prepared_dir, split, d), build):
        log.info("cached split %s: %d subjects, %d tokens -> %s", split, meta["subjects"], meta["tokens"], target)
    return target


def save_visit_starts(tokens: np.ndarray, vs: int, path: Path, chunk: int = 1 << 24) -> None:
    """`np.flatnonzero(tokens == vs)` saved as .npy, in chunks of memory-mapped tokens (count, then fill)."""
    n = sum(int(np.count_nonzero(tokens[a : a + chunk] == vs)) for a in range(0, len(tokens), chunk))
    out = np.lib.format.open_memmap(path, "w+", np.int64, (n,))
    at = 0
    for a in range(0, len(tokens), chunk):
        found = np.flatnonzero(tokens[a : a + chunk] == vs) + a
        out[at : at + len(found)] = found
        at += len(found)
    out.flush()
