"""PretrainDataModule: cache, visit-aligned crops with valid prompts, packing, determinism."""

from __future__ import annotations

import os
import pickle
import shutil
from pathlib import Path

import numpy as np
import pytest

from cehrx.data.datamodule import PackedBatchSampler, PretrainDataModule
from cehrx.data.packing import IGNORE_INDEX, crop_starts, make_samples, pack_lengths, token_uniform_crops
from cehrx.data.shards import PROMPT_LEN, TokenArrays, load_split
from cehrx.data.vocab import DEATH, END, PAD, PROMPT_KINDS, VS
from cehrx.errors import DataError

MAX_LEN, BUDGET = 48, 160


@pytest.fixture()
def prepared(synthetic_prepared: Path, tmp_path: Path) -> Path:
    """A private copy (tests write the cache into it)."""
    return Path(shutil.copytree(synthetic_prepared, tmp_path / "prep"))


@pytest.fixture()
def dm(prepared: Path) -> PretrainDataModule:
    m = PretrainDataModule(str(prepared), max_seq_len=MAX_LEN, max_tokens_per_batch=BUDGET, seed=7)
    m.setup("fit")
    return m


def sequences(batch: dict) -> list[np.ndarray]:
    ids, cu = batch["input_ids"].numpy(), batch["cu_seqlens"].numpy()
    return [ids[cu[i] : cu[i + 1]] for i in range(len(cu) - 1)]


def all_batches(ds, epoch: int) -> list[dict]:
    return [ds[(epoch, b)] for b in range(len(ds.plan(epoch).batches))]


def test_cache_is_memory_mapped_reused_and_rebuilt(prepared: Path, dm: PretrainDataModule) -> None:
    meta = prepared / "cache" / "train" / "meta.json"
    assert isinstance(dm.train_set.arrays.tokens, np.memmap)
    ref = load_split(prepared, "train")
    assert np.array_equal(dm.train_set.arrays.tokens, ref.tokens) and np.array_equal(
        dm.train_set.arrays.offsets, ref.offsets
    )
    built = meta.stat().st_mtime_ns
    PretrainDataModule(str(prepared), max_seq_len=MAX_LEN, max_tokens_per_batch=BUDGET).setup()
    assert meta.stat().st_mtime_ns == built  # fresh cache reused
    shard = prepared / "tokens" / "train" / "0.parquet"
    future = meta.stat().st_mtime + 10
    os.utime(shard, (future, future))
    PretrainDataModule(str(prepared), max_seq_len=MAX_LEN, max_tokens_per_batch=BUDGET).setup()
    assert meta.stat().st_mtime_ns != built  # a newer shard invalidates it
    assert not [p for p in (prepared / "cache").iterdir() if p.name.startswith(".")]  # no temp leftovers


def test_crops_start_at_visits_with_valid_prompts(dm: PretrainDataModule) -> None:
    vocab, ds = dm.vocab, dm.train_set
    kinds = np.asarray(vocab.kinds)
    arrays = ds.arrays
    for epoch in (0, 1):
        plan = ds.plan(epoch)
        s = plan.samples
        assert (s.lengths <= MAX_LEN).all()
        cropped = s.start > PROMPT_LEN
        assert cropped.any(), "the fixture must force crops at MAX_LEN"
        body0 = np.asarray(arrays.tokens)[arrays.offsets[s.subject] + s.start]
        assert (body0[cropped] == vocab[VS]).all()
        for batch in all_batches(ds, epoch):
            for seq in sequences(batch):
                assert list(kinds[seq[:PROMPT_LEN]]) == list(PROMPT_KINDS)
                assert seq[PROMPT_LEN] == vocab[VS]
                assert not np.isin(seq[PROMPT_LEN:], [vocab[PAD]]).any()


def test_recomputed_prompt_matches_the_visit(dm: PretrainDataModule) -> None:
    vocab, arrays = dm.vocab, dm.train_set.arrays
    s = dm.train_set.plan(0).samples
    for i in np.flatnonzero(s.start > PROMPT_LEN):
        sub = s.subject[i]
        toks, times = arrays.subject(sub)
        t0 = int(times[s.start[i]])
        year = int(np.datetime64(t0, "s").astype("datetime64[Y]").astype(int)) + 1970
        age = int((t0 - int(arrays.birth_time[sub])) // (365.25 * 86400))
        assert vocab.tokens[s.prompt[i, 0]] == f"YEAR//{year}"
        assert vocab.tokens[s.prompt[i, 1]] == f"AGE//{age}"
        assert list(s.prompt[i, 2:]) == list(toks[2:4])  # gender, race kept
        assert (s.prompt_time[i] == t0).all()


@pytest.mark.parametrize("sampling", ["visits", "tokens"])
def test_whole_sequences_end_with_end_token(prepared: Path, sampling: str) -> None:
    dm = PretrainDataModule(
        str(prepared), max_seq_len=MAX_LEN, max_tokens_per_batch=BUDGET, seed=7, crop_sampling=sampling
    )
    dm.setup("fit")
    arrays, vocab = dm.train_set.arrays, dm.vocab
    s = dm.train_set.plan(0).samples
    whole = arrays.lengths()[s.subject] + 1 <= MAX_LEN
    assert whole.any()
    assert (s.end[whole]).all() and (s.start[whole] == PROMPT_LEN).all()
    by_subject = {}
    plan = dm.train_set.plan(0)
    for b, batch in enumerate(all_batches(dm.train_set, 0)):
        for seq, end in zip(sequences(batch), s.end[plan.batches[b]]):
            assert (seq[-1] == vocab[END]) == end  # [END] exactly where the sample reaches the record's end
            assert end or len(seq) == MAX_LEN or sampling == "tokens"  # a visit crop short of the end is full
            by_subject.setdefault(len(seq), []).append(seq)
    toks, _ = arrays.subject(int(np.flatnonzero(whole)[0]))
    assert any(np.array_equal(seq, np.append(toks, vocab[END])) for seq in by_subject.get(len(toks) + 1, []))


def test_packing_budget_cu_seqlens_labels(dm: PretrainDataModule) -> None:
    n_samples = 0
    for batch in all_batches(dm.train_set, 0):
        ids, labels, pos, cu = (batch[k].numpy() for k in ("input_ids", "labels", "position_ids", "cu_seqlens"))
        T = len(ids)
        assert batch["n_tokens"] == T <= BUDGET
        assert cu[0] == 0 and cu[-1] == T and (np.diff(cu) > 0).all() and cu.dtype == np.int32
        assert batch["max_seqlen"] == np.diff(cu).max() <= MAX_LEN
        assert np.array_equal(pos, np.concatenate([np.arange(n) for n in np.diff(cu)]))
        ends = cu[1:] - 1
        assert (labels[ends] == IGNORE_INDEX).all()
        inner = np.setdiff1d(np.arange(T), ends)
        assert np.array_equal(labels[inner], ids[inner + 1])
        assert len(batch["times"]) == T and (np.diff(batch["times"].numpy()[cu[0] : cu[1]]) >= 0).all()
        n_samples += len(cu) - 1
    assert n_samples == len(dm.train_set.arrays)  # one crop per subject per epoch


def test_pad_to_budget_gives_static_shapes(prepared: Path) -> None:
    m = PretrainDataModule(str(prepared), max_seq_len=MAX_LEN, max_tokens_per_batch=BUDGET, pad_to_budget=True)
    m.setup()
    for batch in all_batches(m.train_set, 0):
        ids, labels, cu = batch["input_ids"].numpy(), batch["labels"].numpy(), batch["cu_seqlens"].numpy()
        n = batch["n_tokens"]
        assert len(ids) == BUDGET and batch["max_seqlen"] == MAX_LEN
        assert (ids[n:] == m.vocab[PAD]).all() and (labels[n:] == IGNORE_INDEX).all()
        assert n in cu and np.diff(cu).max() <= MAX_LEN  # padding is its own segment(s)


def test_epochs_reshuffle_crops_deterministically(prepared: Path, dm: PretrainDataModule) -> None:
    a0, a1 = dm.train_set.plan(0), dm.train_set.plan(1)
    assert not np.array_equal(a0.samples.start, a1.samples.start) or not all(
        np.array_equal(x, y) for x, y in zip(a0.batches, a1.batches, strict=False)
    )
    other = PretrainDataModule(str(prepared), max_seq_len=MAX_LEN, max_tokens_per_batch=BUDGET, seed=7)
    other.setup()
    b = other.train_set.plan(1)
    assert np.array_equal(a1.samples.start, b.samples.start)
    assert all(np.array_equal(x, y) for x, y in zip(a1.batches, b.batches, strict=True))


def test_validation_is_fixed_and_visit_aligned(dm: PretrainDataModule) -> None:
    v = dm.val_set
    first = [b["input_ids"].numpy() for b in all_batches(v, 0)]
    again = [b["input_ids"].numpy() for b in all_batches(v, 5)]
    assert all(np.array_equal(x, y) for x, y in zip(first, again, strict=True))
    s = v.plan(0).samples
    long = v.arrays.lengths()[s.subject] + 1 > MAX_LEN
    assert long.any()
    # the last window: it reaches the end of the record (and so ends with [END]) when a visit allows
    assert s.end[long].mean() > 0.5


def test_sampler_splits_ranks_evenly(dm: PretrainDataModule) -> None:
    ds = dm.train_set
    n = len(ds.plan(0).batches)
    keys = [list(PackedBatchSampler(ds, rank=r, world_size=2)) for r in (0, 1)]
    assert len(keys[0]) == len(keys[1]) == n // 2
    assert not set(keys[0]) & set(keys[1])
    vkeys = [list(PackedBatchSampler(dm.val_set, rank=r, world_size=3)) for r in range(3)]
    assert len({len(k) for k in vkeys}) == 1
    real = sorted(b for k in vkeys for _, b in k if b >= 0)
    assert real == list(range(len(dm.val_set.plan(0).batches)))
    empty = dm.val_set[(0, -1)]
    assert empty["n_tokens"] == 0 and (empty["labels"] == IGNORE_INDEX).all()


def test_dataset_pickles_without_the_token_data(dm: PretrainDataModule) -> None:
    blob = pickle.dumps(dm.train_set)
    assert len(blob) < 200_000
    clone = pickle.loads(blob)
    assert np.array_equal(clone[(0, 1)]["input_ids"].numpy(), dm.train_set[(0, 1)]["input_ids"].numpy())


def test_dataloader_yields_batches(dm: PretrainDataModule) -> None:
    batches = list(dm.train_dataloader())
    assert len(batches) == len(dm.train_dataloader()) and set(batches[0]) >= {
        "input_ids",
        "labels",
        "cu_seqlens",
        "max_seqlen",
        "times",
        "n_tokens",
    }


def test_pack_lengths_covers_every_item_within_budget() -> None:
    rng = np.random.default_rng(0)
    lengths = rng.integers(5, 100, size=500)
    batches = pack_lengths(lengths, 256)
    flat = np.concatenate(batches)
    assert sorted(flat.tolist()) == list(range(500))
    assert all(lengths[b].sum() <= 256 for b in batches)
    assert lengths.sum() / (256 * len(batches)) > 0.9  # tight packing
    with pytest.raises(ValueError, match="exceeds the batch budget"):
        pack_lengths(np.array([300]), 256)


def test_unigram_baseline_is_sane(dm: PretrainDataModule) -> None:
    ppl = dm.unigram_perplexity()
    assert 1.0 < ppl < len(dm.vocab)


def test_missing_vocab_is_a_clear_error(tmp_path: Path) -> None:
    with pytest.raises(DataError, match="no vocab.json"):
        PretrainDataModule(str(tmp_path), max_seq_len=MAX_LEN, max_tokens_per_batch=BUDGET).setup()


def test_budget_must_hold_a_crop(prepared: Path) -> None:
    with pytest.raises(ValueError, match="exceeds max_tokens_per_batch"):
        PretrainDataModule(str(prepared), max_seq_len=512, max_tokens_per_batch=256).setup()


def test_sampler_resumes_mid_epoch(dm: PretrainDataModule) -> None:
    """After a resume the epoch continues at the trainer's batch progress, not from its start."""
    full = list(PackedBatchSampler(dm.train_set))
    resumed = list(PackedBatchSampler(dm.train_set, skip_fn=lambda: 3))
    assert resumed == full[3:]


def test_cache_is_streamed_and_equals_the_loaded_split(synthetic_prepared, tmp_path) -> None:
    """`build_cache` flattens a split a batch of subjects at a time; the arrays are those of `load_split`."""
    from cehrx.data.shards import TokenArrays, save_split
    from cehrx.data.token_cache import build_cache, save_visit_starts
    from cehrx.data.vocab import VS, Vocab

    vocab = Vocab.load(synthetic_prepared)
    for split in ("train", "tuning"):
        ref = load_split(synthetic_prepared, split)
        small = save_split(synthetic_prepared, split, tmp_path / f"{split}_by3", batch_rows=3)
        cached = TokenArrays.load_npy(build_cache(synthetic_prepared, split, tmp_path / "cache", vocab))
        for arrays in (small, cached):
            for name in ("subject_id", "offsets", "tokens", "times", "birth_time"):
                assert np.array_equal(getattr(arrays, name), getattr(ref, name)), (split, name)
        starts = np.load(tmp_path / "cache" / split / "visit_starts.npy")
        assert np.array_equal(starts, np.flatnonzero(ref.tokens == vocab[VS]))
        save_visit_starts(ref.tokens, vocab[VS], tmp_path / "vs.npy", chunk=7)  # chunk edges inside the data
        assert np.array_equal(np.load(tmp_path / "vs.npy"), starts)


@pytest.mark.parametrize("sampling", ["visits", "tokens"])
def test_both_crop_samplings_start_at_visits_with_the_visit_prompt(prepared: Path, sampling: str) -> None:
    m = PretrainDataModule(
        str(prepared), max_seq_len=MAX_LEN, max_tokens_per_batch=BUDGET, seed=7, crop_sampling=sampling
    )
    m.setup("fit")
    arrays, vocab, kinds = m.train_set.arrays, m.vocab, np.asarray(m.vocab.kinds)
    length = arrays.lengths()
    for epoch in (0, 1):
        s = m.train_set.plan(epoch).samples
        assert (s.lengths <= MAX_LEN).all() and (s.n_body > 0).all()
        assert (s.start + s.n_body + s.end <= length[s.subject] + 1).all()
        assert ((s.start + s.n_body)[s.end] == length[s.subject][s.end]).all()  # [END] only at the record's end
        cropped = s.start > PROMPT_LEN
        assert (np.asarray(arrays.tokens)[arrays.offsets[s.subject] + s.start][cropped] == vocab[VS]).all()
        whole = length[s.subject] + 1 <= MAX_LEN
        assert whole.any() and (s.start[whole] == PROMPT_LEN).all() and s.end[whole].all()
        for batch in all_batches(m.train_set, epoch):
            for seq in sequences(batch):
                assert list(kinds[seq[:PROMPT_LEN]]) == list(PROMPT_KINDS) and seq[PROMPT_LEN] == vocab[VS]
    v = m.val_set.plan(0).samples  # validation windows do not depend on the sampling
    ref = PretrainDataModule(str(prepared), max_seq_len=MAX_LEN, max_tokens_per_batch=BUDGET, seed=7)
    ref.setup("fit")
    assert np.array_equal(v.start, ref.val_set.plan(0).samples.start)


def one_long_record(visits: int, visit_len: int) -> tuple[TokenArrays, np.ndarray]:
    """A prompt and `visits` visits of `visit_len` tokens each (a `[VS]` first)."""
    n = PROMPT_LEN + visits * visit_len
    arrays = TokenArrays(
        subject_id=np.array([1]),
        offsets=np.array([0, n]),
        tokens=np.zeros(n, np.int32),
        times=np.zeros(n, np.int64),
        birth_time=np.zeros(1, np.int64),
    )
    return arrays, PROMPT_LEN + np.arange(visits) * visit_len


def coverage(sampler, arrays: TokenArrays, draws: int) -> np.ndarray:
    """How often each body position and `[END]` (the last entry) is inside a crop, over `draws` draws."""
    n = int(arrays.lengths()[0])
    cov = np.zeros(n + 1 - PROMPT_LEN)
    rng = np.random.default_rng(0)
    for _ in range(draws):
        start, stop = sampler(rng)
        cov[start[0] - PROMPT_LEN : stop[0] - PROMPT_LEN] += 1
    return cov / draws


def test_token_sampling_covers_a_record_evenly_and_its_end_as_often_as_its_middle() -> None:
    """The point of `crop_sampling=tokens`: a long record's last tokens (where `[DEATH]` is) are trained as
    often as its middle; visit sampling reaches them in one crop of (visits - context visits)."""
    arrays, vs = one_long_record(visits=200, visit_len=5)
    max_len = PROMPT_LEN + 100  # 20 visits a crop
    room = max_len - PROMPT_LEN

    def visits(rng):
        start = crop_starts(arrays, vs, max_len, rng)
        return start, np.minimum(start + room, arrays.lengths() + 1)

    tokens = coverage(lambda rng: token_uniform_crops(arrays, vs, max_len, rng), arrays, 4000)
    old = coverage(visits, arrays, 4000)
    middle = slice(room, len(tokens) - room)
    assert tokens[-1] == pytest.approx(tokens[middle].mean(), rel=0.25)  # [END] as often as the middle
    assert tokens[:5].mean() == pytest.approx(tokens[middle].mean(), rel=0.25)  # and the first visit
    assert np.abs(tokens[middle] / tokens[middle].mean() - 1).max() < 0.2
    assert old[-1] < 0.2 * old[middle].mean()  # what visit sampling does: the end in 1 crop of 181
    with pytest.raises(ValueError, match="crop_sampling='token': choose one of visits, tokens"):
        make_samples(arrays, vs, None, max_len, np.random.default_rng(0), "token")


def test_end_token_after_death_drops_the_end_target_of_alive_records(prepared: Path) -> None:
    """`end_token=after_death`: an alive record's end is censoring (the extract ends), so its crop stops
    without `[END]`; a record that ends in `[DEATH]` keeps its `[END]`. Nothing else changes."""
    runs = {}
    for end_token in ("always", "after_death"):
        m = PretrainDataModule(
            str(prepared), max_seq_len=MAX_LEN, max_tokens_per_batch=BUDGET, seed=7, end_token=end_token
        )
        m.setup("fit")
        runs[end_token] = (m.train_set.plan(0).samples, m)
    (a, m), (b, _) = runs["always"], runs["after_death"]
    arrays, vocab = m.train_set.arrays, m.vocab
    died = np.asarray(arrays.tokens)[arrays.offsets[1:] - 1][a.subject] == vocab[DEATH]
    assert (a.end & died).any() and (a.end & ~died).any(), "the fixture must have both kinds of record end"
    assert np.array_equal(b.end, a.end & died)
    assert np.array_equal(a.start, b.start) and np.array_equal(a.n_body, b.n_body)  # the same body tokens
    for samples, dm in runs.values():  # what the batches hold: [END] exactly where `end` says
        seqs = [s for batch in all_batches(dm.train_set, 0) for s in sequences(batch)]
        assert sum(int(s[-1] == vocab[END]) for s in seqs) == int(samples.end.sum())
    with pytest.raises(ValueError, match="end_token='death': choose one of always, after_death"):
        PretrainDataModule(str(prepared), max_seq_len=MAX_LEN, max_tokens_per_batch=BUDGET, end_token="death").setup()


def test_token_crops_stay_inside_their_subject_on_random_layouts() -> None:
    """Random records (some without visits, some with tokens before their first `[VS]`, some that fit):
    every crop starts at its own subject's visit or its first body token, is non-empty and fits."""
    rng = np.random.default_rng(1)
    for _ in range(50):
        lengths = rng.integers(PROMPT_LEN + 1, PROMPT_LEN + 120, size=4)
        offsets = np.concatenate([[0], np.cumsum(lengths)])
        starts = [
            off + PROMPT_LEN + np.unique(rng.integers(0, n - PROMPT_LEN, size=rng.integers(0, 8)))
            for off, n in zip(offsets[:-1], lengths)
        ]
        vs = np.sort(np.concatenate(starts)).astype(np.int64)
        n = int(offsets[-1])
        arrays = TokenArrays(np.arange(4), offsets, np.zeros(n, np.int32), np.zeros(n, np.int64), np.zeros(4, np.int64))
        max_len = int(rng.integers(PROMPT_LEN + 2, PROMPT_LEN + 60))
        start, stop = token_uniform_crops(arrays, vs, max_len, rng)
        assert ((stop > start) & (stop - start <= max_len - PROMPT_LEN) & (stop <= lengths + 1)).all()
        for i in range(4):
            own = set((starts[i] - offsets[i]).tolist()) | {PROMPT_LEN}
            assert int(start[i]) in own
