"""`PretrainDataModule`: memory-mapped token arrays -> visit-aligned crops -> packed batches.

Why it looks like this:

- **Memory-mapped arrays, not Python objects.** On first use each split's parquet shards are
  flattened once into `.npy` files (`<prepared_dir>/cache/<split>/`, written to a temporary
  name and renamed, rebuilt when a shard or `vocab.json` is newer) and every process, worker
  and rank memory-maps them. A million patients cost a few arrays, not a million lists.
- **Crops start at a visit.** A patient longer than `max_seq_len` is cropped to a window that
  starts at a `[VS]` token, with the demographic prompt (YEAR, AGE, GENDER, RACE) recomputed
  for that visit, so every sample obeys the grammar of DESIGN §4. A patient that fits is taken
  whole and ends with `[END]` (so is a crop that reaches the end of the record). Training
  crops are drawn anew each epoch from `(seed, epoch)`; validation crops are fixed.
- **Packing, not padding.** Samples are packed into a `max_tokens_per_batch` budget as one
  flat stream with `cu_seqlens` (flash-attn's varlen convention): positions restart per
  patient, the last label of every patient is -100, so neither attention nor the loss ever
  crosses a patient boundary. `pad_to_budget` pads T to the budget (padding segments, labels
  -100) for static shapes under `torch.compile`.
- **Deterministic and rank-aware.** A batch is addressed as `(epoch, batch_index)`; every
  worker and rank derives the same plan from the seed, and each rank takes every
  `world_size`-th batch, all ranks the same number (FSDP needs lockstep).

Everything per token is numpy-vectorised; Python loops run per batch at most.
"""

from __future__ import annotations

import json
import logging
import math
import os
import shutil
import uuid
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Iterator

import lightning as L
import numpy as np
import torch
from torch.utils.data import DataLoader, Dataset, DistributedSampler

from cehrx.data import shards
from cehrx.data.shards import PROMPT_LEN, TokenArrays
from cehrx.data.vocab import END, PAD, VS, Vocab
from cehrx.errors import DataError

log = logging.getLogger("cehrx.datamodule")

CACHE_FORMAT = "cehrx.token_cache/1"
IGNORE_INDEX = -100
_CACHE_META = "meta.json"


# --------------------------------------------------------------------------------------------
# on-disk cache: shards -> flat .npy arrays


def _newest_input_mtime(prepared_dir: Path, split: str) -> float:
    paths = shards.shard_paths(prepared_dir, split) + [prepared_dir / "vocab.json"]
    return max(p.stat().st_mtime for p in paths if p.exists())


def cache_is_fresh(prepared_dir: str | Path, split: str, cache_dir: str | Path) -> bool:
    """True when `cache_dir/<split>` was built by this format after every shard and the vocab."""
    meta = Path(cache_dir) / split / _CACHE_META
    if not meta.is_file():
        return False
    try:
        ok = json.loads(meta.read_text()).get("format") == CACHE_FORMAT
    except (OSError, ValueError):
        return False
    return ok and meta.stat().st_mtime >= _newest_input_mtime(Path(prepared_dir), split)


def build_cache(prepared_dir: str | Path, split: str, cache_dir: str | Path, vocab: Vocab) -> Path:
    """Flatten a split's shards into `.npy` arrays (+ `[VS]` positions) under `cache_dir/<split>`.

    Streamed shard file by shard file (`shards.save_split`), so memory stays bounded whatever the
    split's size. Written to a temporary sibling and renamed, so concurrent ranks or a crash never leave
    a half-written cache that looks complete. Returns the split's cache directory.
    """
    prepared_dir, cache_dir = Path(prepared_dir), Path(cache_dir)
    target = cache_dir / split
    if cache_is_fresh(prepared_dir, split, cache_dir):
        return target
    cache_dir.mkdir(parents=True, exist_ok=True)
    tmp = cache_dir / f".{split}.tmp-{uuid.uuid4().hex[:8]}"
    try:
        arrays = shards.save_split(prepared_dir, split, tmp)  # streamed: a batch of subjects in memory at a time
        save_visit_starts(arrays.tokens, vocab[VS], tmp / "visit_starts.npy")
        meta = {"format": CACHE_FORMAT, "split": split, "subjects": len(arrays), "tokens": int(len(arrays.tokens))}
        (tmp / _CACHE_META).write_text(json.dumps(meta) + "\n")
        if target.exists():  # stale (or built meanwhile by another rank): replace it
            old = cache_dir / f".{split}.old-{uuid.uuid4().hex[:8]}"
            os.replace(target, old)
            shutil.rmtree(old, ignore_errors=True)
        os.replace(tmp, target)
    except OSError:
        shutil.rmtree(tmp, ignore_errors=True)
        if not cache_is_fresh(prepared_dir, split, cache_dir):  # not a lost race: a real error
            raise
        return target
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


# --------------------------------------------------------------------------------------------
# crops


@dataclass
class Samples:
    """One crop per row; `start`/`n_body` index the subject's own tokens (prompt excluded)."""

    subject: np.ndarray  # int64 row in TokenArrays
    start: np.ndarray  # int64 first body token, relative to the subject (>= PROMPT_LEN)
    n_body: np.ndarray  # int64 body tokens taken
    end: np.ndarray  # bool: append [END] (the crop reaches the end of the record)
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
    picks that last candidate (the deterministic validation window); otherwise uniform.
    """
    off, length = arrays.offsets[:-1], arrays.lengths()
    room = max_seq_len - PROMPT_LEN  # body tokens + [END] a crop can hold
    bound = length + 1 - room  # a crop from `p` reaches the end (incl. [END]) iff p >= bound
    first = np.searchsorted(visit_starts, off + PROMPT_LEN)
    last = np.searchsorted(visit_starts, off + length)  # visits of subject i: [first, last)
    k = np.clip(np.searchsorted(visit_starts, off + np.maximum(bound, PROMPT_LEN)), first, last)
    count = (k - first) + (k < last)
    if rng is None:
        pick = first + count - 1
    else:
        pick = first + np.floor(rng.random(len(off)) * count).astype(np.int64)
    has = count > 0
    starts = np.full(len(off), PROMPT_LEN, dtype=np.int64)
    starts[has] = visit_starts[pick[has]] - off[has]
    starts[length + 1 <= max_seq_len] = PROMPT_LEN  # fits whole
    return starts


def make_samples(
    arrays: TokenArrays, visit_starts: np.ndarray, vocab: Vocab, max_seq_len: int, rng: np.random.Generator | None
) -> Samples:
    """Crops of every subject (see `crop_starts`) with their prompts, as flat arrays."""
    n = len(arrays)
    off, length = arrays.offsets[:-1].astype(np.int64), arrays.lengths().astype(np.int64)
    start = crop_starts(arrays, visit_starts, max_seq_len, rng)
    room = max_seq_len - PROMPT_LEN
    take = np.minimum(length + 1 - start, room)  # body tokens + [END]
    end = start + take == length + 1
    n_body = np.maximum(take - end, 0)
    pidx = off[:, None] + np.arange(PROMPT_LEN)
    prompt = np.asarray(arrays.tokens[pidx.ravel()], dtype=np.int32).reshape(n, PROMPT_LEN)
    prompt_time = np.asarray(arrays.times[pidx.ravel()], dtype=np.int64).reshape(n, PROMPT_LEN)
    cropped = np.flatnonzero(start > PROMPT_LEN)
    if len(cropped):
        g = off[cropped] + start[cropped]
        t0 = np.asarray(arrays.times[g], dtype=np.int64)
        prompt[cropped] = shards.prompt_ids(
            vocab, t0, np.asarray(arrays.birth_time)[cropped], prompt[cropped, 2], prompt[cropped, 3]
        )
        prompt_time[cropped] = t0[:, None]
    return Samples(np.arange(n, dtype=np.int64), start, n_body, end, prompt, prompt_time)


# --------------------------------------------------------------------------------------------
# packing


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


# --------------------------------------------------------------------------------------------
# dataset + sampler


@dataclass
class Plan:
    """One epoch: the crops and how they are packed (`batches[b]` indexes `samples`)."""

    samples: Samples
    batches: list[np.ndarray]


class PackedCropDataset(Dataset):
    """Packed batches of visit-aligned crops, addressed by `(epoch, batch_index)`.

    Batch -1 is an all-padding batch (used to even out ranks). The plan of an epoch is a pure
    function of `(seed, epoch)`, so workers and ranks agree without communicating. Pickling
    drops the memory maps (workers under `spawn` reopen them instead of copying the data).
    """

    def __init__(
        self,
        cache_dir: str | Path,
        vocab: Vocab,
        max_seq_len: int,
        max_tokens_per_batch: int,
        train: bool,
        seed: int = 0,
        pad_to_budget: bool = False,
        lookahead: int = 256,
    ) -> None:
        if max_seq_len > max_tokens_per_batch:
            raise ValueError(
                f"max_seq_len={max_seq_len} exceeds max_tokens_per_batch={max_tokens_per_batch}: a crop must fit in a batch"
            )
        if max_seq_len <= PROMPT_LEN + 1:
            raise ValueError(f"max_seq_len={max_seq_len} leaves no room after the {PROMPT_LEN}-token prompt")
        self.cache_dir, self.vocab = Path(cache_dir), vocab
        self.max_seq_len, self.budget, self.train = max_seq_len, max_tokens_per_batch, train
        self.seed, self.pad_to_budget, self.lookahead = seed, pad_to_budget, lookahead
        self.end_id, self.pad_id = vocab[END], vocab[PAD]
        self._arrays: TokenArrays | None = None
        self._visit_starts: np.ndarray | None = None
        self._plan: tuple[int, Plan] | None = None

    @property
    def arrays(self) -> TokenArrays:
        if self._arrays is None:
            self._arrays = TokenArrays.load_npy(self.cache_dir)
            self._visit_starts = np.load(self.cache_dir / "visit_starts.npy", mmap_mode="r")
        return self._arrays

    @property
    def visit_starts(self) -> np.ndarray:
        self.arrays  # noqa: B018 (opens the maps)
        assert self._visit_starts is not None
        return self._visit_starts

    def __getstate__(self) -> dict[str, Any]:
        return {**self.__dict__, "_arrays": None, "_visit_starts": None, "_plan": None}

    def plan(self, epoch: int) -> Plan:
        """The crops and packing of `epoch` (validation: the same for every epoch)."""
        key = epoch if self.train else 0
        if self._plan is None or self._plan[0] != key:
            rng = np.random.default_rng([self.seed, key]) if self.train else None
            samples = make_samples(self.arrays, self.visit_starts, self.vocab, self.max_seq_len, rng)
            lengths = samples.lengths
            order = rng.permutation(len(samples)) if rng is not None else np.argsort(-lengths, kind="stable")
            batches = [order[b] for b in pack_lengths(lengths[order], self.budget, self.lookahead)]
            self._plan = (key, Plan(samples, batches))
        return self._plan[1]

    def __getitem__(self, key: tuple[int, int]) -> dict[str, Any]:
        epoch, b = key
        pad_to = self.budget if self.pad_to_budget else None
        fixed = self.max_seq_len if self.pad_to_budget else None
        if b < 0:
            return empty_batch(self.pad_id, pad_to, self.max_seq_len, fixed)
        plan = self.plan(epoch)
        return collate_packed(
            self.arrays, plan.samples.take(plan.batches[b]), self.end_id, self.pad_id, pad_to, self.max_seq_len, fixed
        )

    def __len__(self) -> int:
        return len(self.plan(0).batches)


class PackedBatchSampler(DistributedSampler):
    """Yields `(epoch, batch_index)` keys: this rank's share, the same count on every rank.

    Subclasses `DistributedSampler` only so Lightning does not replace it: the sharding is
    done here (rank r takes batches r, r + world, ...). Training epochs have the length of
    epoch 0 (crop lengths, hence batch counts, vary slightly between epochs; extra batches of
    an epoch are dropped, missing ones wrap around). Validation pads ranks with empty batches.

    `skip_fn` (training) says how many batches of the current epoch are already done: after a
    mid-epoch resume the epoch continues where it stopped instead of replaying its start.
    """

    def __init__(
        self, dataset: PackedCropDataset, rank: int = 0, world_size: int = 1, skip_fn: Callable[[], int] | None = None
    ) -> None:  # noqa: D107
        self.dataset, self.rank, self.num_replicas, self.skip_fn = dataset, rank, world_size, skip_fn
        self.epoch, self.shuffle, self.drop_last, self.seed = 0, dataset.train, False, dataset.seed
        n0 = len(dataset.plan(0).batches)
        self.per_rank = max(n0 // world_size, 1) if dataset.train else max(math.ceil(n0 / world_size), 1)

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def __len__(self) -> int:
        return self.per_rank

    def __iter__(self) -> Iterator[tuple[int, int]]:
        n = len(self.dataset.plan(self.epoch).batches)
        skip = self.skip_fn() if self.skip_fn is not None else 0  # batches of this epoch already trained on
        for j in range(min(max(skip, 0), self.per_rank), self.per_rank):
            b = self.rank + self.num_replicas * j
            if self.dataset.train:
                yield (self.epoch, b % max(n, 1))
            else:
                yield (self.epoch, b if b < n else -1)


def _identity(batch: dict[str, Any]) -> dict[str, Any]:
    return batch


class ResumableDataLoader(DataLoader):
    """A DataLoader Lightning treats as resumable (`state_dict` / `load_state_dict`).

    There is no state of its own to save: the position inside an epoch is the trainer's batch
    progress, which the sampler reads through `skip_fn` when an epoch's iteration starts.
    """

    def state_dict(self) -> dict[str, Any]:
        return {"resumes_from": "trainer batch progress"}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        pass


# --------------------------------------------------------------------------------------------
# the datamodule


class PretrainDataModule(L.LightningDataModule):
    """Packed, visit-aligned crops of a prepared dir for `cehrx task=pretrain`.

    `prepare_data` (one process per node) builds the `.npy` cache; `setup` memory-maps it.
    Batches are dicts (see `collate_packed`); `n_tokens` counts real tokens (for tokens/s).
    """

    def __init__(
        self,
        prepared_dir: str,
        max_seq_len: int = 512,
        max_tokens_per_batch: int = 8192,
        val_max_tokens_per_batch: int | None = None,
        pad_to_budget: bool = False,
        num_workers: int = 0,
        prefetch_factor: int | None = 2,
        pin_memory: bool | None = None,
        persistent_workers: bool = False,
        seed: int = 42,
        cache_dir: str | None = None,
        train_split: str = "train",
        val_split: str = "tuning",
        lookahead: int = 256,
    ) -> None:
        super().__init__()
        self.save_hyperparameters()
        self.prepared_dir = Path(prepared_dir)
        self.cache_root = Path(cache_dir) if cache_dir else self.prepared_dir / "cache"
        self.max_seq_len, self.budget = int(max_seq_len), int(max_tokens_per_batch)
        self.val_budget = int(val_max_tokens_per_batch or max_tokens_per_batch)
        self.pad_to_budget, self.seed, self.lookahead = pad_to_budget, seed, lookahead
        self.num_workers, self.prefetch_factor, self.persistent_workers = (
            num_workers,
            prefetch_factor,
            persistent_workers,
        )
        self.pin_memory = torch.cuda.is_available() if pin_memory is None else pin_memory
        self.splits = {"train": train_split, "val": val_split}
        self.vocab: Vocab | None = None
        self.train_set: PackedCropDataset | None = None
        self.val_set: PackedCropDataset | None = None

    def _load_vocab(self) -> Vocab:
        if self.vocab is None:
            path = self.prepared_dir / "vocab.json"
            if not path.is_file():
                raise DataError(
                    f"no vocab.json in {self.prepared_dir}: not a prepared dir (run `cehrx task=prepare output_dir={self.prepared_dir}`)"
                )
            self.vocab = Vocab.load(path)
        return self.vocab

    def prepare_data(self) -> None:
        vocab = self._load_vocab()
        for split in self.splits.values():
            try:
                build_cache(self.prepared_dir, split, self.cache_root, vocab)
            except FileNotFoundError as e:
                raise DataError(str(e)) from e

    def setup(self, stage: str | None = None) -> None:
        if self.train_set is not None:
            return
        self.prepare_data()  # no-op when fresh; covers use without a Trainer
        vocab = self._load_vocab()
        kw = dict(
            vocab=vocab,
            max_seq_len=self.max_seq_len,
            seed=self.seed,
            pad_to_budget=self.pad_to_budget,
            lookahead=self.lookahead,
        )
        self.train_set = PackedCropDataset(
            self.cache_root / self.splits["train"], max_tokens_per_batch=self.budget, train=True, **kw
        )
        self.val_set = PackedCropDataset(
            self.cache_root / self.splits["val"], max_tokens_per_batch=self.val_budget, train=False, **kw
        )
        for name, ds in (("train", self.train_set), ("val", self.val_set)):
            if len(ds.arrays) == 0:
                raise DataError(
                    f"the {self.splits[name]!r} split of {self.prepared_dir} has no subjects: {name} needs some (check task.splits of prepare)"
                )

    def _rank_world(self) -> tuple[int, int]:
        trainer = getattr(self, "trainer", None)
        return (trainer.global_rank, trainer.world_size) if trainer is not None else (0, 1)

    def _batches_done(self) -> int:
        """Batches of the current epoch the trainer has completed (restored on resume; 0 otherwise)."""
        try:
            return int(self.trainer.fit_loop.epoch_loop.batch_progress.current.ready)  # type: ignore[union-attr]
        except AttributeError:
            return 0

    def _loader(self, ds: PackedCropDataset) -> DataLoader:
        workers = int(self.num_workers)
        cls, skip = (ResumableDataLoader, self._batches_done) if ds.train else (DataLoader, None)
        return cls(
            ds,
            batch_size=None,
            sampler=PackedBatchSampler(ds, *self._rank_world(), skip_fn=skip),
            collate_fn=_identity,
            num_workers=workers,
            prefetch_factor=self.prefetch_factor if workers > 0 else None,
            persistent_workers=bool(self.persistent_workers) and workers > 0,
            pin_memory=bool(self.pin_memory),
        )

    def train_dataloader(self) -> DataLoader:
        assert self.train_set is not None, "call setup() first"
        return self._loader(self.train_set)

    def val_dataloader(self) -> DataLoader:
        assert self.val_set is not None, "call setup() first"
        return self._loader(self.val_set)

    def unigram_perplexity(self) -> float:
        """Perplexity on the validation targets of a unigram model of the train tokens.

        The baseline a sequence model must beat: token frequencies of the train split (each
        subject also ends once with `[END]`), add-one smoothed, scored on exactly the targets
        the validation loss is computed on.
        """
        self.setup()  # no-op when set up (this process may not be the one that trained)
        assert self.train_set is not None and self.val_set is not None
        vocab = self._load_vocab()
        counts = np.bincount(np.asarray(self.train_set.arrays.tokens), minlength=len(vocab)).astype(np.float64)
        counts[vocab[END]] += len(self.train_set.arrays)
        logp = np.log((counts + 1.0) / (counts.sum() + len(counts)))
        plan = self.val_set.plan(0)
        total, n = 0.0, 0
        for b in range(len(plan.batches)):
            labels = self.val_set[(0, b)]["labels"].numpy()
            labels = labels[labels != IGNORE_INDEX]
            total -= float(logp[labels].sum())
            n += len(labels)
        return float(math.exp(total / max(n, 1)))
