"""Fine-tuning building blocks: the readout, packed batches, LoRA, budgets, no leakage."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from cehrx.data.history import cut_histories
from cehrx.errors import CehrxError
from cehrx.finetune.data import LabelledHistories, PackedBatchSampler, loader
from cehrx.finetune.model import SequenceClassifier, apply_lora, parameter_counts
from cehrx.finetune.module import FinetuneModule, predict_logits
from cehrx.model.config import GPTConfig
from cehrx.model.transformer import GPT
from cehrx.probe.embed import embed
from tests.unit.test_probe import gpt, mid_times, plant_future, prepared  # noqa: F401 (fixtures)

CPU = torch.device("cpu")


def _hist(prepared, max_len=64):
    arrays, _, vocab = prepared
    rows = np.arange(len(arrays))
    return cut_histories(arrays, vocab, arrays.subject_id[rows], mid_times(arrays, rows), max_len=max_len)


def test_head_reads_the_probe_representation(prepared, gpt) -> None:
    """A head with weight w on the readout gives exactly w . embed(): probe and fine-tune read the same state."""
    h = _hist(prepared)
    for pooling in ("last", "mean"):
        clf = SequenceClassifier(gpt, pooling)
        w = np.random.default_rng(0).normal(size=gpt.config.n_embd)
        clf.init_head(w, 0.5)
        rows, logits = predict_logits(
            clf, loader(LabelledHistories(h, np.zeros(len(h)), np.arange(len(h))), 512, False), CPU
        )
        want = embed(gpt, h, pooling, progress=False) @ w + 0.5
        assert np.allclose(logits.numpy(), want[rows], atol=1e-4)


def test_batches_cover_every_row_once_and_reshuffle_per_epoch() -> None:
    lengths = np.random.default_rng(1).integers(5, 60, 300)
    s = PackedBatchSampler(lengths, 200, shuffle=True, seed=3)
    first = list(s)
    assert sorted(i for b in first for i in b) == list(range(300))
    assert all(lengths[b].sum() <= 200 for b in first)
    s.set_epoch(1)
    assert list(s) != first
    s.set_epoch(0)
    assert list(s) == first  # seeded: a resumed run sees the same order


def test_lora_freezes_the_backbone_and_trains_under_two_percent(gpt) -> None:
    import copy

    clf = SequenceClassifier(copy.deepcopy(gpt))
    total = parameter_counts(clf)["total"]
    apply_lora(clf, rank=1, alpha=2, dropout=0.0)
    counts = parameter_counts(clf)
    assert counts["total"] > total and counts["trainable"] == counts["total"] - total + clf.head.weight.numel() + 1
    assert all(("lora_" in n or n.startswith("head.")) == p.requires_grad for n, p in clf.named_parameters())
    with pytest.raises(CehrxError, match="matched no module"):
        apply_lora(SequenceClassifier(copy.deepcopy(gpt)), 2, 4, 0.0, targets=r"nothing\.here")
    # the shipped recipe (rank 8 on qkv and out) on the Synthea 20k model's shape: under 2 % of the weights
    shape = GPTConfig(name="tiny", vocab_size=3865, n_layer=4, n_embd=128, n_head=4, max_seq_len=1024)
    synthea = SequenceClassifier(GPT(shape))
    apply_lora(synthea, rank=8, alpha=16, dropout=0.0)
    assert 0.01 < parameter_counts(synthea)["trainable_fraction"] < 0.02


def test_class_weighting_is_undone_in_the_reported_risk(gpt) -> None:
    m = FinetuneModule(
        SequenceClassifier(gpt), lr=1e-4, head_lr=1e-3, weight_decay=0.0, warmup_steps=0, total_steps=10, pos_weight=9.0
    )
    # a logit of log(9) under a 9x positive weight is the weighted optimum of a 50 % risk... of 10 % unweighted
    assert m.probabilities(torch.tensor([np.log(9.0)])) == pytest.approx([0.5])


def test_l2sp_adds_the_pull_towards_the_pretrained_weights(prepared, gpt) -> None:
    """L2-SP: the loss is the BCE plus l2sp * the squared distance of the backbone (not the head) from its start."""
    import copy

    h = _hist(prepared)
    batch = next(iter(loader(LabelledHistories(h, np.arange(len(h)) % 2, np.arange(len(h))), 512, False)))
    kw = dict(lr=1e-4, head_lr=1e-3, weight_decay=0.0, warmup_steps=0, total_steps=10)
    plain = FinetuneModule(SequenceClassifier(copy.deepcopy(gpt)), **kw)
    pulled = FinetuneModule(SequenceClassifier(copy.deepcopy(gpt)), l2sp=0.5, **kw)
    assert pulled.training_step(batch, 0).item() == pytest.approx(plain.training_step(batch, 0).item())  # at the start
    with torch.no_grad():
        for m in (plain, pulled):
            m.classifier.head.weight.add_(1.0)  # the head is not pulled
            next(p for n, p in m.classifier.named_parameters() if not n.startswith("head.")).add_(0.1)
    n = next(p for n, p in pulled.classifier.named_parameters() if not n.startswith("head.")).numel()
    want = plain.training_step(batch, 0).item() + 0.5 * n * 0.1**2
    assert pulled.training_step(batch, 0).item() == pytest.approx(want, rel=1e-4)


def test_budgets_and_rows() -> None:
    from cehrx.tasks.finetune import budget_rows, budgets

    assert budgets([16, 64, "all", 10_000], 500) == ["16", "64", "all"]
    assert budgets(None, 5) == ["all"]
    y = np.repeat(np.array([True] * 10 + [False] * 90), 2)  # rows 0..199; the train split is every other row
    train = np.arange(100) * 2
    k = budget_rows(y, train, "16", 0)
    assert len(k) == 16 and np.isin(k, train).all() and y[k].any() and not y[k].all()
    assert np.array_equal(budget_rows(y, train, "all", 0), train)


def test_planted_future_event_changes_no_fine_tuned_prediction(prepared, gpt) -> None:
    arrays, _, vocab = prepared
    rows = np.arange(0, len(arrays), 2)
    t = mid_times(arrays, rows)
    planted = plant_future(arrays, rows, t, vocab["[DEATH]"])
    a = cut_histories(arrays, vocab, arrays.subject_id[rows], t, max_len=64)
    b = cut_histories(planted, vocab, arrays.subject_id[rows], t, max_len=64)
    clf = SequenceClassifier(gpt, "mean")
    clf.init_head(np.ones(gpt.config.n_embd), 0.0)
    idx = np.arange(len(a))
    pa_ = predict_logits(clf, loader(LabelledHistories(a, np.zeros(len(a)), idx), 512, False), CPU)
    pb_ = predict_logits(clf, loader(LabelledHistories(b, np.zeros(len(b)), idx), 512, False), CPU)
    assert np.array_equal(pa_[0], pb_[0]) and torch.equal(pa_[1], pb_[1])


def test_rows_by_role_and_meds_dev_split_tuning() -> None:
    from types import SimpleNamespace

    from cehrx.tasks.finetune import select_rows

    n = 400
    split = np.array(["train", "train", "tuning", "held_out"] * (n // 4))
    c = SimpleNamespace(sid=np.arange(n), split=split, y=np.arange(n) % 3 == 0)
    f = {"max_tuning_labels": None, "max_test_labels": 50}
    rows = select_rows(c, f, 0)
    assert (split[rows["train"]] == "train").all() and (split[rows["tuning"]] == "tuning").all()
    assert len(rows["test"]) == 50 and (split[rows["test"]] == "held_out").all()
    rows = select_rows(c, f, 0, "tuning")  # scores tuning; early stopping on a fixed part of train, never held_out
    assert (split[rows["test"]] == "tuning").all() and (split[rows["tuning"]] == "train").all()
    assert not set(rows["tuning"]) & set(rows["train"]) and 0.05 < len(rows["tuning"]) / (n / 2) < 0.3
    with pytest.raises(CehrxError, match="split=held_out or split=tuning"):
        select_rows(c, f, 0, "train")
