"""CehrxLightningModule, objectives and export: losses over real targets only, aux heads,
optimizer groups, metrics, and checkpoint / export round trips with identical logits."""

from __future__ import annotations

import shutil
from pathlib import Path

import lightning as L
import numpy as np
import pytest
import torch

from cehrx.data.datamodule import PretrainDataModule
from cehrx.data.packing import IGNORE_INDEX, collate_packed
from cehrx.data.vocab import DEATH, KINDS, VE, Vocab
from cehrx.model.config import GPTConfig
from cehrx.model.export import export_checkpoint, load_pretrained
from cehrx.model.lightning_module import CehrxLightningModule
from cehrx.model.objectives import future_code_classes, future_code_targets, time_tables

MAX_LEN, BUDGET = 48, 160
MICRO = dict(n_layer=2, n_head=2, n_embd=32, max_seq_len=MAX_LEN, attn_backend="sdpa")


@pytest.fixture()
def dm(synthetic_prepared: Path, tmp_path: Path) -> PretrainDataModule:
    prepared = shutil.copytree(synthetic_prepared, tmp_path / "prep")
    m = PretrainDataModule(str(prepared), max_seq_len=MAX_LEN, max_tokens_per_batch=BUDGET, seed=3)
    m.setup("fit")
    return m


def make_module(vocab: Vocab, **kw) -> CehrxLightningModule:
    torch.manual_seed(0)
    m = CehrxLightningModule(GPTConfig(vocab_size=len(vocab), **MICRO).to_dict(), vocab=vocab, **kw)
    m.configure_model()
    return m.eval()


def samples_batch(dm: PretrainDataModule, b: int = 0, **kw) -> dict:
    ds = dm.train_set
    plan = ds.plan(0)
    return collate_packed(ds.arrays, plan.samples.take(plan.batches[b]), ds.end_id, ds.pad_id, **kw)


def tiny_trainer(tmp_path: Path, max_steps: int) -> L.Trainer:
    return L.Trainer(
        accelerator="cpu",
        devices=1,
        max_steps=max_steps,
        val_check_interval=max_steps,
        check_val_every_n_epoch=None,
        limit_val_batches=2,
        num_sanity_val_steps=0,
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        default_root_dir=str(tmp_path),
    )


@torch.no_grad()
def test_loss_ignores_padding(dm: PretrainDataModule) -> None:
    m = make_module(dm.vocab)
    plain = samples_batch(dm)
    n = plain["n_tokens"]
    padded = samples_batch(dm, pad_to=n + 60, pad_segment=MAX_LEN, max_seqlen=MAX_LEN)  # two padding segments
    assert len(padded["input_ids"]) == n + 60 and len(padded["cu_seqlens"]) == len(plain["cu_seqlens"]) + 2
    loss_plain = m.compute_losses(plain)[0]
    loss_padded = m.compute_losses(padded)[0]
    padded["input_ids"][n:] = torch.randint(0, len(dm.vocab), (60,))  # other padding tokens
    loss_garbage = m.compute_losses(padded)[0]
    torch.testing.assert_close(loss_plain, loss_padded, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(loss_plain, loss_garbage, rtol=1e-5, atol=1e-6)


@torch.no_grad()
def test_loss_never_crosses_patients(dm: PretrainDataModule) -> None:
    """The packed loss sum equals the sum of each patient's loss computed alone."""
    m = make_module(dm.vocab)
    ds = dm.train_set
    plan = ds.plan(0)
    idx = plan.batches[0]
    assert len(idx) >= 3
    _, packed, _ = m.compute_losses(samples_batch(dm))
    alone = [
        m.compute_losses(collate_packed(ds.arrays, plan.samples.take(idx[i : i + 1]), ds.end_id, ds.pad_id))[1]["loss"]
        for i in range(len(idx))
    ]
    assert int(packed["loss"].count) == sum(int(a.count) for a in alone) == samples_batch(dm)["n_tokens"] - len(idx)
    torch.testing.assert_close(packed["loss"].total, sum(a.total for a in alone), rtol=1e-4, atol=1e-4)


def test_time_head_targets_from_vocab(dm: PretrainDataModule) -> None:
    t = time_tables(dm.vocab)
    assert t["gap_ymd"][dm.vocab["D45"]].tolist() == [0, 1, 14]
    assert t["gap_ymd"][dm.vocab["Y5"]].tolist() == [5, 0, 0]
    assert bool(t["is_gap"][dm.vocab["D0"]]) and not bool(t["is_gap"][dm.vocab["i-D1"]])


def test_time_heads_weighted_and_off_at_zero(dm: PretrainDataModule) -> None:
    off = make_module(dm.vocab)
    assert not off.time_heads.active and not list(off.time_heads.parameters())
    on = make_module(dm.vocab, time_to_visit_weight=0.5, ymd_weight=0.25)
    batch = samples_batch(dm)
    loss, losses, _ = on.compute_losses(batch)
    ce = losses["loss"].mean()
    ttv, ymd = losses["loss_time_to_visit"], losses["loss_ymd"]
    torch.testing.assert_close(loss, ce + 0.5 * ttv.mean() + 0.25 * ymd.mean())
    ids, labels = batch["input_ids"], batch["labels"]
    is_gap = time_tables(dm.vocab)["is_gap"]
    valid = labels != IGNORE_INDEX
    next_gap = valid & is_gap[labels.clamp(min=0)]
    assert int(ttv.count) == int((next_gap & (ids == dm.vocab[VE])).sum()) > 0
    assert int(ymd.count) == int(next_gap.sum())
    loss.backward()
    assert on.time_heads.ymd.weight.grad is not None and torch.isfinite(on.time_heads.ymd.weight.grad).all()


def _future_codes_reference(
    batch: dict, classes: np.ndarray, ve_id: int, horizon_s: int, n_codes: int, death_id: int | None = None
) -> dict[int, np.ndarray]:
    """Per-[VE] loop (test only): codes of the same patient after it, at most `horizon_s` later."""
    ids, labels, times, cu = (batch[k].numpy() for k in ("input_ids", "labels", "times", "cu_seqlens"))
    out = {}
    for a, b in zip(cu[:-1], cu[1:]):
        died = death_id is not None and (ids[a:b] == death_id).any()  # a record ending in death is fully seen
        for i in range(a, b):
            if ids[i] != ve_id or labels[i] == IGNORE_INDEX or (times[a:b].max() < times[i] + horizon_s and not died):
                continue
            out[i] = np.zeros(n_codes, dtype=np.float32)
            for k in range(i + 1, b):
                if times[k] <= times[i] + horizon_s and classes[ids[k]] >= 0:
                    out[i][classes[ids[k]]] = 1.0
    return out


def test_future_code_targets_match_a_per_visit_loop(dm: PretrainDataModule) -> None:
    """The set-based targets equal a loop over each [VE]: own patient only, within the horizon, censored
    when the crop ends first. Fails if windows cross a pack boundary or ignore the horizon."""
    classes = future_code_classes(dm.vocab, 16)
    assert (classes >= 0).sum() == 16 and sorted(classes[classes >= 0]) == list(range(16))
    assert (classes[dm.vocab.kind_array() == KINDS.index("visit")] >= 0).all()  # visit types are outcomes too
    ve = dm.vocab[VE]
    checked = positives = 0
    for days in (7, 60, 400):
        for b in range(3):
            batch = samples_batch(dm, b=b)
            assert (
                np.diff(batch["times"].numpy())[
                    np.diff(np.searchsorted(batch["cu_seqlens"].numpy(), np.arange(batch["n_tokens"]), "right")) == 0
                ]
                >= 0
            ).all()
            idx, target = future_code_targets(
                batch["input_ids"],
                batch["labels"],
                batch["times"],
                batch["cu_seqlens"],
                torch.tensor(ve),
                torch.from_numpy(classes),
                days * 86400,
                16,
                torch.tensor(dm.vocab[DEATH]),
            )
            want = _future_codes_reference(batch, classes, ve, days * 86400, 16, dm.vocab[DEATH])
            assert idx.tolist() == sorted(want)
            if len(want):
                np.testing.assert_array_equal(target.numpy(), np.stack([want[i] for i in sorted(want)]))
            checked += len(want)
            positives += int(target.sum())
    assert checked > 0 and positives > 0


def test_future_code_targets_keep_a_window_that_holds_the_death() -> None:
    """`[DEATH]` is a record's last event: a window that runs past it is not censored, it holds the death."""
    vs, code, ve, gap, death, end = 0, 1, 2, 3, 4, 5
    ids = torch.tensor([vs, code, ve, gap, death, end])
    day = 86400
    times = torch.tensor([0, 0, 0, 100 * day, 100 * day, 100 * day])
    labels = torch.cat([ids[1:], torch.tensor([IGNORE_INDEX])])
    cu = torch.tensor([0, 6])
    classes = torch.full((6,), -1, dtype=torch.long)
    classes[death] = 0
    args = (ids, labels, times, cu, torch.tensor(ve), classes, 365 * day, 1)
    idx, _ = future_code_targets(*args)
    assert idx.tolist() == []  # without the rule: censored, the crop ends before the horizon
    idx, target = future_code_targets(*args, torch.tensor(death))
    assert idx.tolist() == [2] and target.tolist() == [[1.0]]


def test_future_codes_head_weighted_and_learns(dm: PretrainDataModule) -> None:
    m = make_module(dm.vocab, future_codes_weight=0.5, future_codes_horizon_days=60.0, future_codes_n=16)
    assert make_module(dm.vocab).future_codes is None
    batch = samples_batch(dm)
    loss, losses, _ = m.compute_losses(batch)
    fc = losses["loss_future_codes"]
    torch.testing.assert_close(loss, losses["loss"].mean() + 0.5 * fc.mean())
    assert int(fc.count) > 0
    loss.backward()
    assert torch.isfinite(m.future_codes.proj.weight.grad).all() and m.future_codes.proj.weight.grad.abs().sum() > 0
    assert any(p.grad is not None and p.grad.abs().sum() > 0 for p in m.model.blocks[0].parameters())


def test_weight_decay_only_on_matrices(dm: PretrainDataModule) -> None:
    m = make_module(dm.vocab, max_steps=10, ymd_weight=1.0)
    opt = m.configure_optimizers()["optimizer"]
    decay, no_decay = opt.param_groups
    assert decay["weight_decay"] > 0 and no_decay["weight_decay"] == 0
    assert all(p.ndim >= 2 for p in decay["params"]) and all(p.ndim < 2 for p in no_decay["params"])
    assert len(decay["params"]) + len(no_decay["params"]) == len(list(m.parameters()))


def test_checkpoint_and_export_roundtrip_identical_logits(dm: PretrainDataModule, tmp_path: Path) -> None:
    m = make_module(dm.vocab, lr=1e-2, warmup_steps=1, time_to_visit_weight=0.1, ymd_weight=0.1).train()
    trainer = tiny_trainer(tmp_path, max_steps=3)
    trainer.fit(m, datamodule=dm)
    names = set(trainer.callback_metrics)
    for key in (
        "train/loss",
        "train/ppl",
        "train/acc_code",
        "train/acc_time",
        "train/lr",
        "train/tokens_per_s",
        "train/loss_time_to_visit",
        "train/loss_ymd",
        "val/loss",
        "val/ppl",
        "val/acc_code",
        "val/acc_time",
        "val/loss_time_to_visit",
        "val/loss_ymd",
    ):
        assert key in names, key
    torch.testing.assert_close(trainer.callback_metrics["val/ppl"], trainer.callback_metrics["val/loss"].exp())
    ckpt = tmp_path / "m.ckpt"
    trainer.save_checkpoint(ckpt)
    batch = samples_batch(dm, b=1)
    m.eval()
    with torch.no_grad():
        want = m.logits(batch)
        loaded = CehrxLightningModule.load_from_checkpoint(ckpt, map_location="cpu").eval()
        torch.testing.assert_close(loaded.logits(batch), want, rtol=0, atol=0)
        assert loaded._vocab_json["tokens"][5]["token"] == dm.vocab.tokens[5]  # self-describing
        out = export_checkpoint(ckpt, tmp_path / "run" / "model", dm.prepared_dir / "vocab.json", train_config={"a": 1})
        assert {p.name for p in out.iterdir()} >= {
            "model.safetensors",
            "config.json",
            "vocab.json",
            "train_config.yaml",
            "export.json",
        }
        gpt, vocab = load_pretrained(tmp_path / "run")  # the run dir resolves to run/model
        assert len(vocab) == len(dm.vocab)
        h = gpt(
            batch["input_ids"],
            position_ids=batch["position_ids"],
            cu_seqlens=batch["cu_seqlens"],
            max_seqlen=batch["max_seqlen"],
        )
        torch.testing.assert_close(gpt.lm_head_logits(h), want, rtol=0, atol=0)
        assert gpt.lm_head.weight is gpt.wte.weight  # tying survives the export


def test_export_consolidates_a_sharded_checkpoint(dm: PretrainDataModule, tmp_path: Path) -> None:
    """An FSDP `state_dict_type=sharded` checkpoint dir (torch.distributed.checkpoint) exports like a file."""
    import torch.distributed.checkpoint as dcp
    from lightning.fabric.utilities.load import _METADATA_FILENAME

    m = make_module(dm.vocab)
    sharded = tmp_path / "last.ckpt"
    dcp.save({"model": m.state_dict()}, checkpoint_id=str(sharded))
    torch.save(
        {"hyper_parameters": dict(m.hparams), "global_step": 7, "cehrx": {"model_config": m.config.to_dict()}},
        sharded / _METADATA_FILENAME,
    )
    export_checkpoint(sharded, tmp_path / "model", dm.prepared_dir / "vocab.json")
    gpt, _ = load_pretrained(tmp_path / "model")
    batch = samples_batch(dm)
    with torch.no_grad():
        h = gpt(
            batch["input_ids"],
            position_ids=batch["position_ids"],
            cu_seqlens=batch["cu_seqlens"],
            max_seqlen=batch["max_seqlen"],
        )
        torch.testing.assert_close(gpt.lm_head_logits(h), m.logits(batch), rtol=0, atol=0)


def test_validation_metrics_are_token_weighted(dm: PretrainDataModule) -> None:
    """val/loss is sum(CE) / n_targets over all batches, not a mean of batch means."""
    m = make_module(dm.vocab)
    m.on_validation_epoch_start()
    total, count = 0.0, 0
    with torch.no_grad():
        for b in range(len(dm.val_set.plan(0).batches)):
            batch = dm.val_set[(0, b)]
            m.validation_step(batch, b)
            _, losses, _ = m.compute_losses(batch)
            total += float(losses["loss"].total)
            count += int(losses["loss"].count)
    s, n = m._val["loss"]
    assert int(n) == count and abs(float(s) / float(n) - total / count) < 1e-5
    np.testing.assert_array_less(0, count)
