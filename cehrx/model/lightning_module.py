"""`CehrxLightningModule`: the training wrapper around a `GPT` backbone (it is not the model).

It owns what training needs and inference does not: the losses and auxiliary time heads, the
optimizer and schedule, metric bookkeeping and checkpoint metadata. The backbone is built in
`configure_model` so FSDP can shard it while it is being built, and it is exported alone
(`cehrx.model.export`) for probe / zero-shot / generate.

Checkpoints are self-describing: hyperparameters (including the `GPTConfig` dict) are saved
by `save_hyperparameters`, the vocabulary travels in `checkpoint["cehrx"]["vocab"]`, and the
per-token lookup tables are persistent buffers.
"""

from __future__ import annotations

import math
import time
from typing import Any

import lightning as L
import numpy as np
import torch
from torch import Tensor

from cehrx.data.vocab import Vocab
from cehrx.errors import CehrxError
from cehrx.model.config import GPTConfig
from cehrx.model.objectives import (
    IGNORE_INDEX,
    FutureCodesHead,
    LossSum,
    TimeHeads,
    next_token_loss,
    token_accuracy,
)
from cehrx.model.transformer import GPT, Block

_WRAPPER_PREFIXES = ("_fsdp_wrapped_module.", "_checkpoint_wrapped_module.", "_orig_mod.")
CHECKPOINT_FORMAT = "cehrx.checkpoint/1"


def clean_param_name(name: str) -> str:
    """A parameter name without the prefixes FSDP, activation checkpointing and compile insert.

    >>> clean_param_name("model.blocks.0._fsdp_wrapped_module.attn.qkv.weight")
    'model.blocks.0.attn.qkv.weight'
    """
    for prefix in _WRAPPER_PREFIXES:
        name = name.replace(prefix, "")
    return name


def block_wrap_policy() -> Any:
    """FSDP auto-wrap policy: one FSDP unit per transformer `Block` (for `configs/trainer/fsdp.yaml`)."""
    from torch.distributed.fsdp.wrap import ModuleWrapPolicy

    return ModuleWrapPolicy({Block})


class WarmupCosine:
    """LR multiplier: linear warmup over `warmup` steps, then cosine decay to `min_ratio` at `total`.

    >>> s = WarmupCosine(warmup=10, total=110, min_ratio=0.1)
    >>> [round(s(i), 3) for i in (0, 9, 10, 60, 110, 500)]
    [0.1, 1.0, 1.0, 0.55, 0.1, 0.1]
    """

    def __init__(self, warmup: int, total: int, min_ratio: float) -> None:
        self.warmup, self.total, self.min_ratio = max(int(warmup), 0), max(int(total), 1), float(min_ratio)

    def __call__(self, step: int) -> float:
        if step < self.warmup:
            return (step + 1) / self.warmup
        progress = min((step - self.warmup) / max(self.total - self.warmup, 1), 1.0)
        return self.min_ratio + (1.0 - self.min_ratio) * 0.5 * (1.0 + math.cos(math.pi * progress))


class CehrxLightningModule(L.LightningModule):
    """Next-token pretraining of a `GPT` on packed batches from `PretrainDataModule`.

    `vocab` is needed when training from scratch (metric masks, time-head targets); when
    loading a checkpoint it is restored from the checkpoint. `max_steps=None` uses the
    trainer's `max_steps` (or its estimated total) as the end of the cosine schedule.
    """

    def __init__(
        self,
        model_config: dict[str, Any],
        vocab: Vocab | None = None,
        lr: float = 1e-3,
        weight_decay: float = 0.1,
        betas: tuple[float, float] = (0.9, 0.95),
        eps: float = 1e-8,
        warmup_steps: int = 100,
        min_lr_ratio: float = 0.1,
        max_steps: int | None = None,
        time_to_visit_weight: float = 0.0,
        ymd_weight: float = 0.0,
        future_codes_weight: float = 0.0,
        future_codes_horizon_days: float = 365.0,
        future_codes_n: int = 256,
        compile: bool = False,
        compile_mode: str | None = None,
    ) -> None:
        super().__init__()
        model_config = dict(model_config)
        self.save_hyperparameters(ignore=["vocab"])
        self.config = GPTConfig.from_dict(model_config)
        if self.config.vocab_size is None:
            raise ValueError("model_config.vocab_size is None: fill it from the prepared dir's vocab.json")
        if vocab is not None and len(vocab) != self.config.vocab_size:
            raise ValueError(f"vocab has {len(vocab)} tokens but model_config.vocab_size={self.config.vocab_size}")
        if future_codes_weight > 0 and (
            future_codes_n < 1 or future_codes_horizon_days <= 0
        ):  # at build time, before any output
            raise CehrxError(
                f"the future-codes head needs task.module.future_codes_n >= 1 and future_codes_horizon_days > 0, "
                f"got {future_codes_n} and {future_codes_horizon_days}"
            )
        self.vocab = vocab
        self._vocab_json = vocab.to_json() if vocab is not None else None
        kinds = (
            torch.from_numpy(vocab.kind_array().astype(np.int64))
            if vocab is not None
            else torch.zeros(self.config.vocab_size, dtype=torch.long)
        )
        self.register_buffer("token_kind", kinds)
        self.model: GPT | None = None
        self.time_heads: TimeHeads | None = None
        self.future_codes: FutureCodesHead | None = None
        self._decay_names: set[str] = set()
        self._val: dict[str, Tensor] = {}
        self._last_step_time: float | None = None
        self.tokens_seen = 0  # real tokens trained on by this process in this run

    # ------------------------------------------------------------------------ building

    def configure_model(self) -> None:
        """Build the backbone and heads (once; FSDP calls this inside its wrapping context)."""
        if self.model is not None:
            return
        hp = self.hparams
        self.model = GPT(self.config)
        self.time_heads = TimeHeads(
            self.config.n_embd, self.config.vocab_size, hp.time_to_visit_weight, hp.ymd_weight, self.vocab
        )
        if hp.future_codes_weight > 0:
            self.future_codes = FutureCodesHead(
                self.config.n_embd, self.config.vocab_size, hp.future_codes_horizon_days, hp.future_codes_n, self.vocab
            )
        # Decided here, on the unwrapped modules: under FSDP (use_orig_params) parameters become
        # flat 1-D shards, so their ndim can no longer tell matrices from gains.
        self._decay_names = {n for n, p in self.named_parameters() if p.ndim >= 2}
        if hp.compile:
            self.model.compile(mode=hp.compile_mode)  # in place: state-dict keys stay unprefixed

    def configure_optimizers(self) -> dict[str, Any]:
        """AdamW, weight decay on >= 2-D weights only; warmup + cosine, stepped per optimizer step."""
        hp = self.hparams
        decay, no_decay = [], []
        for name, p in self.named_parameters():
            if p.requires_grad:
                (decay if clean_param_name(name) in self._decay_names else no_decay).append(p)
        groups = [{"params": decay, "weight_decay": hp.weight_decay}, {"params": no_decay, "weight_decay": 0.0}]
        opt = torch.optim.AdamW(groups, lr=hp.lr, betas=tuple(hp.betas), eps=hp.eps)
        schedule = WarmupCosine(hp.warmup_steps, self._total_steps(), hp.min_lr_ratio)
        # A lambda, not the object: LambdaLR checkpoints callable objects' state, which would
        # pin the schedule's length to the first run's max_steps when resuming with more steps.
        sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda step: schedule(step))
        return {"optimizer": opt, "lr_scheduler": {"scheduler": sched, "interval": "step", "frequency": 1}}

    def _total_steps(self) -> int:
        if self.hparams.max_steps:
            return int(self.hparams.max_steps)
        trainer = self._trainer
        if trainer is not None and trainer.max_steps and trainer.max_steps > 0:
            return int(trainer.max_steps)
        if trainer is not None:
            est = trainer.estimated_stepping_batches
            if math.isfinite(est):
                return int(est)
        raise ValueError(
            "set trainer.max_steps (or task.module.max_steps): the cosine schedule needs a total step count"
        )

    # ------------------------------------------------------------------------ forward + losses

    def forward(self, batch: dict[str, Any]) -> Tensor:
        """Hidden states `[T, C]` of a packed batch."""
        assert self.model is not None, "configure_model() has not run"
        return self.model(
            batch["input_ids"],
            position_ids=batch["position_ids"],
            cu_seqlens=batch["cu_seqlens"],
            max_seqlen=int(batch["max_seqlen"]),
        )

    def logits(self, batch: dict[str, Any]) -> Tensor:
        """Next-token logits `[T, vocab]` at every position (for tests and inspection)."""
        assert self.model is not None
        return self.model.lm_head_logits(self(batch))

    def compute_losses(
        self, batch: dict[str, Any]
    ) -> tuple[Tensor, dict[str, LossSum], dict[str, tuple[Tensor, Tensor]]]:
        """(loss to optimise, named LossSums, accuracies) for one batch.

        Logits are computed only at positions with a real target: padding and patient ends
        cost no `[T, vocab]` work and cannot leak into the loss.
        """
        assert self.model is not None and self.time_heads is not None
        h = self(batch)
        labels = batch["labels"]
        idx = torch.nonzero(labels != IGNORE_INDEX).squeeze(-1)
        logits = self.model.lm_head_logits(h[idx])
        target = labels[idx]
        losses = {"loss": next_token_loss(logits, target)}
        loss = losses["loss"].mean()
        if self.time_heads.active:
            for name, ls in self.time_heads(h, batch["input_ids"], labels, batch["times"]).items():
                losses[f"loss_{name}"] = ls
                loss = loss + self.time_heads.weights[name] * ls.mean()
        if self.future_codes is not None:
            ls = self.future_codes(h, batch["input_ids"], labels, batch["times"], batch["cu_seqlens"])
            losses["loss_future_codes"] = ls
            loss = loss + self.hparams.future_codes_weight * ls.mean()
        return loss, losses, token_accuracy(logits.detach(), target, self.token_kind)

    # ------------------------------------------------------------------------ train / val

    def training_step(self, batch: dict[str, Any], batch_idx: int) -> Tensor:
        loss, losses, acc = self.compute_losses(batch)
        log = {f"train/{k}": v.mean().detach() for k, v in losses.items()}
        log["train/ppl"] = torch.exp(log["train/loss"])
        log.update({f"train/{k}": c.float() / n.clamp(min=1) for k, (c, n) in acc.items()})
        log["train/lr"] = (
            torch.tensor(self.trainer.optimizers[0].param_groups[0]["lr"]) if self._trainer else torch.tensor(0.0)
        )
        self.log("train/loss", log.pop("train/loss"), prog_bar=True, on_step=True, on_epoch=False, batch_size=1)
        self.log_dict(log, on_step=True, on_epoch=False, batch_size=1)
        return loss

    def on_train_batch_end(self, outputs: Any, batch: dict[str, Any], batch_idx: int) -> None:
        """Real (not padding) tokens per second over the whole step, summed over ranks."""
        now = time.perf_counter()
        self.tokens_seen += int(batch["n_tokens"])
        if self._last_step_time is not None:
            tps = int(batch["n_tokens"]) * self.trainer.world_size / max(now - self._last_step_time, 1e-9)
            self.log("train/tokens_per_s", float(tps), on_step=True, on_epoch=False, batch_size=1, prog_bar=True)
        self._last_step_time = now

    def on_validation_epoch_start(self) -> None:
        self._val = {}

    def validation_step(self, batch: dict[str, Any], batch_idx: int) -> None:
        _, losses, acc = self.compute_losses(batch)
        parts = {**{k: (v.total.detach(), v.count) for k, v in losses.items()}, **acc}
        for k, (s, n) in parts.items():
            prev = self._val.get(k)
            cur = torch.stack([s.float(), n.float()])
            self._val[k] = cur if prev is None else prev + cur

    def on_validation_epoch_end(self) -> None:
        """Exact token-weighted means over the whole validation set and all ranks."""
        if not self._val:
            return
        names = sorted(self._val)
        totals = torch.stack([self._val[k] for k in names])
        totals = self.trainer.strategy.reduce(totals, reduce_op="sum") if self._trainer else totals
        out = {f"val/{k}": s / n.clamp(min=1) for k, (s, n) in zip(names, totals, strict=True)}
        out["val/ppl"] = torch.exp(out["val/loss"])
        out["val/tokens"] = totals[names.index("loss"), 1]
        # Already reduced over ranks; sync_dist on identical values only silences Lightning's warning.
        self.log(
            "val/loss", out.pop("val/loss"), prog_bar=True, on_step=False, on_epoch=True, sync_dist=True, batch_size=1
        )
        self.log_dict(out, on_step=False, on_epoch=True, sync_dist=True, batch_size=1)

    # ------------------------------------------------------------------------ checkpoints

    def on_save_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        checkpoint["cehrx"] = {
            "format": CHECKPOINT_FORMAT,
            "model_config": self.config.to_dict(),
            "vocab": self._vocab_json,
        }

    def on_load_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        meta = checkpoint.get("cehrx") or {}
        if meta.get("vocab") is not None and self._vocab_json is None:
            self._vocab_json = meta["vocab"]

    def gpt_state_dict(self) -> dict[str, Tensor]:
        """The backbone's plain state dict (for export; not valid while FSDP-sharded)."""
        assert self.model is not None
        return {k: v.detach().cpu() for k, v in self.model.state_dict().items()}
