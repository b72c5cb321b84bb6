"""`PretrainDataModule`: memory-mapped token arrays -> visit-aligned crops -> packed batches.

The parts: the `.npy` cache of each split (`token_cache.py`), crops and packing
(`packing.py`), and here the dataset, the rank-aware sampler and the LightningDataModule.

- **Deterministic and rank-aware.** A batch is addressed as `(epoch, batch_index)`; every
  worker and rank derives the same plan from the seed, and each rank takes every
  `world_size`-th batch, all ranks the same number (FSDP needs lockstep). Training crops are
  drawn anew each epoch from `(seed, epoch)`; validation crops are fixed.
- **Which crop of a long record** (`crop_sampling`): `tokens` (default; every token equally often,
  `packing.token_uniform_crops`) or `visits` (a start visit among the full-length crops,
  `packing.crop_starts`, which trains a record's end, its `[DEATH]`, in one crop of ~100).
- **Resumable.** After a mid-epoch resume the sampler skips the batches of the epoch that the
  trainer already ran (`skip_fn`), instead of replaying its start.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Iterator

import lightning as L
import numpy as np
import torch
from torch.utils.data import DataLoader, Dataset, DistributedSampler

from cehrx.data.packing import (
    IGNORE_INDEX,
    Samples,
    check_crop_options,
    collate_packed,
    empty_batch,
    gets_end,
    make_samples,
    pack_lengths,
)
from cehrx.data.shards import PROMPT_LEN, TokenArrays
from cehrx.data.token_cache import build_cache
from cehrx.data.vocab import END, PAD, Vocab
from cehrx.errors import DataError


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
        crop_sampling: str = "tokens",
        end_token: str = "always",
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
        check_crop_options(crop_sampling, end_token)
        self.crop_sampling, self.end_token = crop_sampling, end_token
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
            samples = make_samples(
                self.arrays, self.visit_starts, self.vocab, self.max_seq_len, rng, self.crop_sampling, self.end_token
            )
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
        crop_sampling: str = "tokens",
        end_token: str = "always",
    ) -> None:
        super().__init__()
        self.save_hyperparameters()
        self.prepared_dir = Path(prepared_dir)
        self.cache_root = Path(cache_dir) if cache_dir else self.prepared_dir / "cache"
        self.max_seq_len, self.budget = int(max_seq_len), int(max_tokens_per_batch)
        self.val_budget = int(val_max_tokens_per_batch or max_tokens_per_batch)
        self.pad_to_budget, self.seed, self.lookahead = pad_to_budget, seed, lookahead
        self.crop_sampling, self.end_token = crop_sampling, end_token
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
            crop_sampling=self.crop_sampling,
            end_token=self.end_token,
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
        subject also ends once with `[END]`, as `end_token` says), add-one smoothed, scored on exactly the targets
        the validation loss is computed on.
        """
        self.setup()  # no-op when set up (this process may not be the one that trained)
        assert self.train_set is not None and self.val_set is not None
        vocab = self._load_vocab()
        counts = np.bincount(np.asarray(self.train_set.arrays.tokens), minlength=len(vocab)).astype(np.float64)
        counts[vocab[END]] += int(gets_end(self.train_set.arrays, vocab, self.end_token).sum())
        logp = np.log((counts + 1.0) / (counts.sum() + len(counts)))
        plan = self.val_set.plan(0)
        total, n = 0.0, 0
        for b in range(len(plan.batches)):
            labels = self.val_set[(0, b)]["labels"].numpy()
            labels = labels[labels != IGNORE_INDEX]
            total -= float(logp[labels].sum())
            n += len(labels)
        return float(math.exp(total / max(n, 1)))
