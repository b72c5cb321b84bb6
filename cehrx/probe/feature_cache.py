"""A store of probe features shared across runs: each history is embedded once per model.

Why: the forward pass is nearly all of a probe's cost (on 2 CPU cores a 512-token history takes
~25 ms with the tiny model), and a study asks for the same histories again and again: tasks
triggered at the same visits, both readouts, the random-init controls of every task. With
`probe.cache_dir` set, a run looks its histories up here and embeds only the missing ones.

What identifies a feature:
- the model: the sha256 of its exported weights, or for a random-init control its seed, its
  architecture and the torch version (the initialisation is torch's RNG);
- the prepared data it reads: `vocab.json`'s content and each token shard's name, size and mtime;
- the history: `max_len`, the subject and the time of the history's last token. A history is every
  token up to a time, so two prediction times with no token between them share one feature;
- the device type (CUDA embeds in bf16, the CPU in fp32) and a format number, to be raised when the
  history cut or the model's forward pass changes what a feature is.

Both readouts (`last`, `mean`) are stored. Layout: `<cache_dir>/<key>/key.json` (what the key is
made of) and `part-*.npz` (subject_id, last_time, last, mean), each written to a temporary name and
renamed, so a killed run leaves no half-written part; two runs at once at worst embed a history twice.
"""

from __future__ import annotations

import hashlib
import json
import uuid
from pathlib import Path
from typing import Callable

import numpy as np

from cehrx.data import shards
from cehrx.data.atomic import atomic_file, write_text
from cehrx.data.history import Histories
from cehrx.data.shards import SPLITS
from cehrx.errors import CehrxError
from cehrx.model.export import resolve_device
from cehrx.probe.embed import embed, embed_poolings

READOUTS = ("last", "mean")


def file_sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def prepared_identity(prepared_dir: Path) -> dict:
    """The token data a history is cut from: vocab content and shard files (name, size, mtime)."""
    files = [p for split in SPLITS for p in shards.shard_paths(prepared_dir, split)]
    return {
        "vocab_sha256": file_sha256(prepared_dir / "vocab.json"),
        "shards": [[str(p.relative_to(prepared_dir)), p.stat().st_size, p.stat().st_mtime_ns] for p in files],
    }


class FeatureCache:
    """Features of one (model, prepared data, max_len) key under `root`."""

    def __init__(self, root: str | Path, key: dict) -> None:
        blob = json.dumps(key, sort_keys=True)
        self.dir = Path(root) / hashlib.sha256(blob.encode()).hexdigest()[:20]
        self.key = key

    def load(self) -> tuple[np.ndarray, np.ndarray, dict[str, np.ndarray]]:
        """Every stored row: (subject_id, last_time, {readout: float32 [n, d]})."""
        parts = sorted(self.dir.glob("part-*.npz")) if self.dir.is_dir() else []
        if not parts:
            return np.zeros(0, np.int64), np.zeros(0, np.int64), {}
        loaded = [np.load(p) for p in parts]
        sid = np.concatenate([z["subject_id"] for z in loaded])
        t = np.concatenate([z["last_time"] for z in loaded])
        return sid, t, {r: np.concatenate([z[r] for z in loaded]) for r in READOUTS}

    def save(self, sid: np.ndarray, t: np.ndarray, feats: dict[str, np.ndarray]) -> None:
        """Add rows as a new part (atomic: temporary name, then rename)."""
        if not len(sid):
            return
        self.dir.mkdir(parents=True, exist_ok=True)
        key_file = self.dir / "key.json"
        if not key_file.is_file():
            write_text(key_file, json.dumps(self.key, indent=1, sort_keys=True) + "\n")
        name = uuid.uuid4().hex
        with (
            atomic_file(self.dir / f"part-{name}.npz") as tmp,
            open(tmp, "wb") as f,
        ):  # a file object: np.savez adds no suffix
            np.savez(
                f, subject_id=sid.astype(np.int64), last_time=t.astype(np.int64), **{r: feats[r] for r in READOUTS}
            )

    def get(
        self, sid: np.ndarray, t: np.ndarray, compute: Callable[[np.ndarray], dict[str, np.ndarray]], chunk: int = 8192
    ) -> tuple[dict[str, np.ndarray], int]:
        """Features of the rows `(sid, t)`; `compute(rows)` embeds rows not stored yet (both readouts).

        Missing rows are embedded and stored `chunk` at a time, so a run killed after hours keeps what
        it finished and its rerun starts from there. Returns the features in row order and how many
        rows were found in the store.
        """
        sid, t = np.asarray(sid, np.int64), np.asarray(t, np.int64)
        c_sid, c_t, c_feats = self.load()
        pos = match_rows(c_sid, c_t, sid, t)
        found = pos >= 0
        missing = np.flatnonzero(~found)
        _, first = np.unique(np.stack([sid[missing], t[missing]], 1), axis=0, return_index=True)
        todo = missing[np.sort(first)]  # a key asked for twice is embedded once
        new = []
        for a in range(0, len(todo), chunk):
            rows = todo[a : a + chunk]
            feats = compute(rows)
            self.save(sid[rows], t[rows], feats)
            new.append(feats)
        d = new[0]["last"].shape[1] if new else c_feats["last"].shape[1] if len(c_sid) else 0
        out = {r: np.zeros((len(sid), d), np.float32) for r in READOUTS}
        if found.any():
            for r in READOUTS:
                out[r][found] = c_feats[r][pos[found]]
        if len(todo):
            at = match_rows(sid[todo], t[todo], sid[missing], t[missing])  # each missing row's embedded twin
            for r in READOUTS:
                out[r][missing] = np.concatenate([f[r] for f in new])[at]
        return out, int(found.sum())


def match_rows(a_sid: np.ndarray, a_t: np.ndarray, q_sid: np.ndarray, q_t: np.ndarray) -> np.ndarray:
    """Index into `a` of each query `(q_sid, q_t)` pair, -1 when absent (vectorised, no dict)."""
    if not len(a_sid) or not len(q_sid):
        return np.full(len(q_sid), -1, np.int64)
    pairs = np.concatenate([np.stack([a_sid, a_t], 1), np.stack([q_sid, q_t], 1)])
    _, inverse = np.unique(pairs, axis=0, return_inverse=True)
    inverse = inverse.ravel()
    slot = np.full(inverse.max() + 1, -1, np.int64)
    slot[inverse[: len(a_sid)]] = np.arange(len(a_sid))
    return slot[inverse[len(a_sid) :]]


def weights_sha256(mdir: Path) -> str:
    """The sha256 of an exported model's weights file: the key of its features."""
    for name in ("model.safetensors", "model.pt"):
        if (mdir / name).is_file():
            return file_sha256(mdir / name)
    raise CehrxError(f"{mdir} has no model.safetensors or model.pt")


class Embedder:
    """The features of one probe run's histories for any model (`p`: the `probe.*` options), read from and
    added to the store at `probe.cache_dir` when it is set, else embedded directly."""

    def __init__(self, p, hist: Histories, sid: np.ndarray, prepared: Path, max_len: int) -> None:
        self.p, self.hist, self.sid, self.max_len = p, hist, sid, max_len
        self.cache_root = p.get("cache_dir")
        self.prepared_key = prepared_identity(prepared) if self.cache_root else None
        self.hits = self.rows = 0

    def __call__(self, model, model_key: dict) -> np.ndarray:
        p, pooling = self.p, str(self.p.pooling)
        args = (int(p.batch_tokens), p.device, bool(p.progress))
        if not self.cache_root:
            return embed(model, self.hist, pooling, *args)
        # the device is part of the key: CUDA runs in bf16, CPU in fp32, and the two must not mix
        device = resolve_device(str(p.device) if p.device is not None else None, "probe.device").type
        cache = FeatureCache(
            self.cache_root,
            {**model_key, "prepared": self.prepared_key, "max_len": self.max_len, "device": device, "format": 1},
        )
        feats, hits = cache.get(
            self.sid, self.hist.last_time, lambda rows: embed_poolings(model, self.hist.take(rows), READOUTS, *args)
        )
        self.hits, self.rows = self.hits + hits, self.rows + len(self.sid)
        return feats[pooling]

    def report(self) -> dict | None:
        if not self.cache_root:
            return None
        return {"dir": str(self.cache_root), "histories": self.rows, "found": self.hits}
