"""The fine-tuned model: the pretrained GPT, the probe's readout, one logit; optional LoRA adapters.

`SequenceClassifier` reads the representation the linear probe reads (`cehrx.probe.embed.pool_hidden`:
the last history token's final hidden state, or the mean), so probe and fine-tune differ only in
what is trained. `apply_lora` injects low-rank adapters with peft (`inject_adapter_in_model` works on
any `nn.Module`, so the GPT class needs no Hugging Face wrapper) and freezes everything else.
"""

from __future__ import annotations

import re

import numpy as np
import torch
from torch import Tensor, nn

from cehrx.errors import CehrxError
from cehrx.model.transformer import GPT
from cehrx.probe.embed import POOLINGS, pool_hidden

METHODS = ("full", "lora")
# LoRA targets by default: the attention projections (qkv, out) of every block. On the 4 x 128 model
# rank 8 trains 1.8 % of the weights; adding the MLP would pass 5 %.
LORA_TARGETS = r"blocks\.\d+\.attn\.(qkv|proj)"


class SequenceClassifier(nn.Module):
    def __init__(self, backbone: GPT, pooling: str = "last") -> None:
        super().__init__()
        if pooling not in POOLINGS:
            raise CehrxError(f"probe.pooling must be one of {POOLINGS}, got {pooling!r}")
        self.backbone, self.pooling = backbone, pooling
        self.head = nn.Linear(backbone.config.n_embd, 1)
        nn.init.zeros_(self.head.weight)
        nn.init.zeros_(self.head.bias)

    def forward(self, input_ids: Tensor, cu_seqlens: Tensor, max_seqlen: int) -> Tensor:
        """Logits `[B]` for the packed histories (`[T]` tokens, `cu_seqlens` `[B + 1]`)."""
        hidden = self.backbone(input_ids, cu_seqlens=cu_seqlens, max_seqlen=max_seqlen)
        return self.head(pool_hidden(hidden, cu_seqlens, self.pooling).float()).squeeze(-1)

    def init_head(self, weight: np.ndarray, bias: float) -> None:
        """Start from a linear probe (LP-FT, Kumar et al. 2022): fine-tuning from a fitted head keeps the
        pretrained features from being distorted by the gradients of a random one in the first steps."""
        with torch.no_grad():
            self.head.weight.copy_(torch.as_tensor(weight, dtype=torch.float32).reshape(1, -1))
            self.head.bias.fill_(float(bias))


def apply_lora(model: SequenceClassifier, rank: int, alpha: float, dropout: float, targets: str = LORA_TARGETS) -> None:
    """LoRA adapters on the backbone's `targets` (a regex over module names); only adapters and head train."""
    from peft import LoraConfig, inject_adapter_in_model

    if rank < 1:
        raise CehrxError(f"finetune.lora.rank must be >= 1, got {rank}")
    config = LoraConfig(
        r=int(rank), lora_alpha=float(alpha), lora_dropout=float(dropout), target_modules=targets, bias="none"
    )
    if not any(re.fullmatch(targets, name) for name, _ in model.backbone.named_modules()):
        linears = [n for n, m in model.backbone.named_modules() if isinstance(m, nn.Linear)]
        raise CehrxError(
            f"finetune.lora.targets={targets!r} matched no module of the model (its linear layers: {', '.join(linears[:8])}, ...)"
        )
    inject_adapter_in_model(config, model.backbone)
    for name, param in model.named_parameters():
        param.requires_grad = "lora_" in name or name.startswith("head.")


def parameter_counts(model: nn.Module) -> dict[str, float]:
    """Trainable and total parameters (tied weights once) and the trainable share."""
    seen, total, trainable = set(), 0, 0
    for p in model.parameters():
        if id(p) in seen:
            continue
        seen.add(id(p))
        total += p.numel()
        trainable += p.numel() if p.requires_grad else 0
    return {"trainable": trainable, "total": total, "trainable_fraction": trainable / max(total, 1)}
