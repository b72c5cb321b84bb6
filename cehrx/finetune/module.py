"""The Lightning module that fine-tunes a `SequenceClassifier`.

Loss: binary cross-entropy with `pos_weight` (class weighting for rare outcomes: with 2 % positives,
`balanced` weighs each positive like 49 negatives). The weighting shifts the optimal logit by
`log(pos_weight)`; `probabilities` subtracts it again, so reported risks estimate the real rate.
Validation (the tuning split) logs `val_auroc`, which early stopping and the best checkpoint watch.
With `l2sp > 0` the loss adds `l2sp * sum((w - w_start)^2)` over the trainable backbone weights (L2-SP,
Li et al. 2018, arXiv 1802.01483): the pull is towards the pretrained weights, not towards zero, which
keeps a small labelled set from washing out what pretraining learned.
"""

from __future__ import annotations

import math

import lightning as L
import numpy as np
import torch
import torch.nn.functional as F

from cehrx.finetune.model import SequenceClassifier


class FinetuneModule(L.LightningModule):
    def __init__(
        self,
        classifier: SequenceClassifier,
        *,
        lr: float,
        head_lr: float,
        weight_decay: float,
        warmup_steps: int,
        total_steps: int,
        pos_weight: float = 1.0,
        l2sp: float = 0.0,
    ) -> None:
        super().__init__()
        self.classifier = classifier
        self.l2sp = float(l2sp)
        # the start of every trainable backbone weight (not persistent: rebuilt identically on resume)
        self._start = {
            n: p.detach().clone()
            for n, p in classifier.named_parameters()
            if p.requires_grad and not n.startswith("head.") and self.l2sp > 0
        }
        self.lr, self.head_lr, self.weight_decay = lr, head_lr, weight_decay
        self.warmup_steps, self.total_steps = max(int(warmup_steps), 0), max(int(total_steps), 1)
        self.register_buffer("pos_weight", torch.tensor(float(pos_weight)), persistent=False)
        self._val: list[tuple[torch.Tensor, torch.Tensor]] = []

    def forward(self, batch: dict) -> torch.Tensor:
        return self.classifier(batch["input_ids"], batch["cu_seqlens"], batch["max_seqlen"])

    def training_step(self, batch: dict, batch_idx: int) -> torch.Tensor:
        loss = F.binary_cross_entropy_with_logits(self(batch), batch["y"], pos_weight=self.pos_weight)
        self.log("train_loss", loss, prog_bar=True, batch_size=len(batch["y"]))
        if self._start:
            params = dict(self.classifier.named_parameters())
            first = next(iter(self._start))
            if self._start[first].device != params[first].device:  # once, after Lightning moved the model
                self._start = {n: w0.to(params[n]) for n, w0 in self._start.items()}
            drift = sum(((params[n] - w0) ** 2).sum() for n, w0 in self._start.items())
            self.log("train_l2sp", drift, batch_size=len(batch["y"]))
            loss = loss + self.l2sp * drift
        return loss

    def validation_step(self, batch: dict, batch_idx: int) -> None:
        logits = self(batch)
        self._val.append((logits.detach().float().cpu(), batch["y"].cpu()))

    def on_validation_epoch_end(self) -> None:
        from sklearn.metrics import roc_auc_score

        if not self._val:
            return
        logits, y = (torch.cat(t) for t in zip(*self._val))
        self._val.clear()
        loss = F.binary_cross_entropy_with_logits(logits, y, pos_weight=self.pos_weight.cpu())
        yb = y.numpy().astype(bool)
        auroc = float(roc_auc_score(yb, logits.numpy())) if 0 < yb.sum() < len(yb) else float("nan")
        self.log("val_loss", loss, prog_bar=True)
        self.log("val_auroc", auroc, prog_bar=True)

    def probabilities(self, logits: torch.Tensor) -> np.ndarray:
        return torch.sigmoid(logits.float() - torch.log(self.pos_weight.cpu())).numpy()

    def configure_optimizers(self):
        head = [p for n, p in self.classifier.named_parameters() if n.startswith("head.") and p.requires_grad]
        body = [p for n, p in self.classifier.named_parameters() if not n.startswith("head.") and p.requires_grad]
        groups = [{"params": head, "lr": self.head_lr, "weight_decay": 0.0}]
        if body:
            groups.append({"params": body, "lr": self.lr, "weight_decay": self.weight_decay})
        opt = torch.optim.AdamW(groups)
        sched = torch.optim.lr_scheduler.LambdaLR(opt, self._schedule)
        return {"optimizer": opt, "lr_scheduler": {"scheduler": sched, "interval": "step"}}

    def _schedule(self, step: int) -> float:
        """Linear warm-up, then cosine decay to 10 % over the planned steps."""
        if step < self.warmup_steps:
            return (step + 1) / self.warmup_steps
        t = min((step - self.warmup_steps) / max(self.total_steps - self.warmup_steps, 1), 1.0)
        return 0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * t))


@torch.inference_mode()
def predict_logits(classifier: SequenceClassifier, dataloader, device: torch.device) -> tuple[np.ndarray, np.ndarray]:
    """`(rows, logits)` over a loader of packed batches, in the loader's order."""
    classifier = classifier.to(device).eval()
    rows, logits = [], []
    for b in dataloader:
        logits.append(classifier(b["input_ids"].to(device), b["cu_seqlens"].to(device), b["max_seqlen"]).float().cpu())
        rows.append(b["rows"])
    return torch.cat(rows).numpy(), torch.cat(logits)
