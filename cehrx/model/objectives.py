"""Training objectives on packed batches: next-token cross-entropy and auxiliary heads.

Every loss is a mean over *real* targets: labels are -100 on padding and at the last token of
each packed patient, so nothing is learned across a patient boundary or from padding.
Losses are also returned as (sum, count) so validation can average exactly over an epoch
and across ranks instead of averaging per-batch means.

Auxiliary heads (CEHR-XGPT style), each off when its weight is 0:

- time to next visit: at a `[VE]` whose next token is a gap token (`D<n>` / `Y<n>`), regress
  log1p(days until that gap token's time), the gap measured from the real `times`;
- year/month/day: wherever the next token is a gap token, classify the years, months and
  days its interval decomposes into (three small softmax heads), a smoother signal than one
  of ~1,200 gap tokens.

Future codes (CEHR-XGPT's time-to-event idea, as a multi-label head): at a `[VE]`, predict which
visit types, `[DEATH]` and most common codes (`n_codes` classes) occur within `horizon_days` after
it. Next-token training only asks the last state of a visit to predict the next gap; this asks it to summarise the patient's
near-term risks, which is what a linear probe reads at a prediction time (the last token of a
history cut at a visit end is a `[VE]`). A `[VE]` whose horizon runs past the end of its crop is
censored (skipped), so an absent code always means "not in the next `horizon_days`".
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor, nn

from cehrx.data.packing import IGNORE_INDEX
from cehrx.data.vocab import DEATH, KINDS, VE, Vocab, time_token_days
from cehrx.model.packed import seq_ids_from_cu_seqlens

N_YEARS, N_MONTHS, N_DAYS = 128, 12, 31
DAYS_PER_YEAR, DAYS_PER_MONTH = 365.25, 30.4375
SECONDS_PER_DAY = 86400.0


@dataclass
class LossSum:
    """A loss as its sum over targets and the number of targets (exact epoch means)."""

    total: Tensor
    count: Tensor

    def mean(self) -> Tensor:
        return self.total / self.count.clamp(min=1)


def next_token_loss(logits: Tensor, labels: Tensor) -> LossSum:
    """Cross-entropy summed over targets != -100 (fp32 softmax even under bf16 autocast)."""
    total = F.cross_entropy(logits.float(), labels, ignore_index=IGNORE_INDEX, reduction="sum")
    return LossSum(total, (labels != IGNORE_INDEX).sum())


def gap_decomposition(days: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Split intervals in days into (years, months, days) classes, clamped to the head sizes.

    >>> [a.tolist() for a in gap_decomposition(np.array([0.0, 45.0, 400.0, 3 * 365.25]))]
    [[0, 0, 1, 3], [0, 1, 1, 0], [0, 14, 4, 0]]
    """
    days = np.maximum(np.asarray(days, dtype=np.float64), 0.0)
    years = np.floor(days / DAYS_PER_YEAR + 1e-9)
    rest = np.maximum(days - years * DAYS_PER_YEAR, 0.0)
    months = np.floor(rest / DAYS_PER_MONTH + 1e-9)
    rest_days = np.floor(np.maximum(rest - months * DAYS_PER_MONTH, 0.0) + 1e-9)
    return (
        np.clip(years, 0, N_YEARS - 1).astype(np.int64),
        np.clip(months, 0, N_MONTHS - 1).astype(np.int64),
        np.clip(rest_days, 0, N_DAYS - 1).astype(np.int64),
    )


def time_tables(vocab: Vocab) -> dict[str, Tensor]:
    """Per-token-id lookup tables: `is_gap` and the year/month/day classes of gap tokens.

    Built once from the vocabulary (a loop over vocab entries, not over data) so targets of a
    batch are plain tensor indexing.
    """
    kinds = vocab.kind_array()
    is_gap = kinds == KINDS.index("gap")
    days = np.array([time_token_days(t) or 0.0 for t in vocab.tokens], dtype=np.float64)
    y, m, d = gap_decomposition(np.where(is_gap, days, 0.0))
    return {
        "is_gap": torch.from_numpy(is_gap),
        "gap_ymd": torch.from_numpy(np.stack([y, m, d], axis=1)),
        "ve_id": torch.tensor(vocab[VE], dtype=torch.long),
    }


class TimeHeads(nn.Module):
    """Auxiliary time heads on the backbone's hidden states (see module docstring).

    The lookup tables are persistent buffers, so a checkpoint carries them and the heads work
    without the vocabulary at load time. A head with weight 0 is not built at all.
    """

    def __init__(
        self,
        n_embd: int,
        vocab_size: int,
        time_to_visit_weight: float = 0.0,
        ymd_weight: float = 0.0,
        vocab: Vocab | None = None,
    ) -> None:
        super().__init__()
        self.weights = {"time_to_visit": float(time_to_visit_weight), "ymd": float(ymd_weight)}
        self.time_to_visit = (
            nn.Sequential(nn.Linear(n_embd, n_embd), nn.GELU(), nn.Linear(n_embd, 1))
            if time_to_visit_weight > 0
            else None
        )
        self.ymd = nn.Linear(n_embd, N_YEARS + N_MONTHS + N_DAYS) if ymd_weight > 0 else None
        tables = (
            time_tables(vocab)
            if vocab is not None
            else {
                "is_gap": torch.zeros(vocab_size, dtype=torch.bool),
                "gap_ymd": torch.zeros(vocab_size, 3, dtype=torch.long),
                "ve_id": torch.tensor(-1, dtype=torch.long),
            }
        )
        if len(tables["is_gap"]) != vocab_size:
            raise ValueError(
                f"vocabulary has {len(tables['is_gap'])} tokens but the model's vocab_size is {vocab_size}"
            )
        for name, t in tables.items():
            self.register_buffer(name, t)

    @property
    def active(self) -> bool:
        return self.time_to_visit is not None or self.ymd is not None

    def forward(self, h: Tensor, input_ids: Tensor, labels: Tensor, times: Tensor) -> dict[str, LossSum]:
        """Auxiliary losses (sum, count) for a packed batch; `h` is `[T, C]` hidden states."""
        valid = labels != IGNORE_INDEX
        safe = labels.clamp(min=0)
        next_is_gap = valid & self.is_gap[safe]
        out: dict[str, LossSum] = {}
        if self.time_to_visit is not None:
            idx = torch.nonzero(next_is_gap & (input_ids == self.ve_id)).squeeze(-1)
            dt = (times[(idx + 1).clamp(max=len(times) - 1)] - times[idx]).clamp(min=0).float() / SECONDS_PER_DAY
            pred = self.time_to_visit(h[idx]).squeeze(-1).float()
            out["time_to_visit"] = LossSum(
                F.mse_loss(pred, torch.log1p(dt), reduction="sum"), torch.tensor(len(idx), device=h.device)
            )
        if self.ymd is not None:
            idx = torch.nonzero(next_is_gap).squeeze(-1)
            logits = self.ymd(h[idx]).float()
            target = self.gap_ymd[labels[idx]]
            parts = torch.split(logits, [N_YEARS, N_MONTHS, N_DAYS], dim=-1)
            total = sum(F.cross_entropy(p, target[:, i], reduction="sum") for i, p in enumerate(parts)) / 3.0
            out["ymd"] = LossSum(total, torch.tensor(len(idx), device=h.device))
        return out


def future_code_classes(vocab: Vocab, n_codes: int) -> np.ndarray:
    """Class of each token id for the future-codes head, -1 for tokens it does not predict.

    The classes are the visit types and `[DEATH]` (the outcomes most tasks are about), then the
    code tokens most train subjects have, `n_codes` in all (ties by id).
    """
    kinds = vocab.kind_array()
    subjects = np.asarray(vocab.subjects, dtype=np.int64)
    events = np.flatnonzero(kinds == KINDS.index("visit"))
    if DEATH in vocab:
        events = np.append(events, vocab[DEATH])
    codes = np.flatnonzero((kinds == KINDS.index("code")) & (subjects > 0))
    top = np.concatenate([events, codes[np.argsort(-subjects[codes], kind="stable")]])[:n_codes]
    classes = np.full(len(vocab), -1, dtype=np.int64)
    classes[top] = np.arange(len(top))
    return classes


def future_code_targets(
    input_ids: Tensor,
    labels: Tensor,
    times: Tensor,
    cu_seqlens: Tensor,
    ve_id: Tensor,
    classes: Tensor,
    horizon_s: int,
    n_codes: int,
    death_id: Tensor | None = None,
) -> tuple[Tensor, Tensor]:
    """(`[VE]` positions, multi-hot `[n, n_codes]` of the codes within `horizon_s` after each).

    Set-based over the packed batch: one sorted `(segment, time)` key, one `searchsorted` for
    each window's end, and a scatter of the window's code classes. A window must end inside its
    own segment (the patient's crop), otherwise that `[VE]` is censored and left out, unless the
    segment holds `death_id`: `[DEATH]` is a record's last event, so nothing after it is unseen
    (without this, every window that holds a death would be censored and the head would learn
    that death never comes within the horizon).
    """
    cu = cu_seqlens.long()
    seg = seq_ids_from_cu_seqlens(cu, len(input_ids))
    key = torch.cummax((seg << 36) | (times - times.min()), 0).values  # sorted even if a prompt time runs ahead
    idx = torch.nonzero((input_ids == ve_id) & (labels != IGNORE_INDEX)).squeeze(-1)
    end = key[idx] + horizon_s
    observed = key[cu[seg[idx] + 1] - 1] >= end
    if death_id is not None:
        died = torch.zeros(len(cu) - 1, dtype=torch.bool, device=idx.device)
        died[seg[input_ids == death_id]] = True
        observed |= died[seg[idx]]
    idx, end = idx[observed], end[observed]
    n = torch.searchsorted(key, end, right=True) - idx - 1  # tokens after each [VE] within the horizon
    rows = torch.repeat_interleave(torch.arange(len(idx), device=idx.device), n)
    starts = torch.cumsum(n, 0) - n
    pos = torch.repeat_interleave(idx + 1 - starts, n) + torch.arange(int(n.sum()), device=idx.device)
    cls = classes[input_ids[pos]]
    keep = cls >= 0
    target = torch.zeros(len(idx), n_codes, device=idx.device)
    target[rows[keep], cls[keep]] = 1.0
    return idx, target


class FutureCodesHead(nn.Module):
    """Multi-label head at `[VE]`: which visit types and common codes occur in the next `horizon_days`.

    The class table is a persistent buffer, so a checkpoint carries it and no vocabulary is
    needed at load time; the output width is always `n_codes`.
    """

    def __init__(
        self, n_embd: int, vocab_size: int, horizon_days: float = 365.0, n_codes: int = 256, vocab: Vocab | None = None
    ) -> None:
        super().__init__()
        self.horizon_s = round(float(horizon_days) * SECONDS_PER_DAY)
        self.n_codes = int(n_codes)
        self.proj = nn.Linear(n_embd, self.n_codes)
        nn.init.normal_(self.proj.weight, std=0.02)
        nn.init.constant_(self.proj.bias, -3.0)  # most codes are absent from most windows
        classes = (
            future_code_classes(vocab, self.n_codes) if vocab is not None else np.full(vocab_size, -1, dtype=np.int64)
        )
        if len(classes) != vocab_size:
            raise ValueError(f"vocabulary has {len(classes)} tokens but the model's vocab_size is {vocab_size}")
        self.register_buffer("classes", torch.from_numpy(classes))
        self.register_buffer("ve_id", torch.tensor(vocab[VE] if vocab is not None else -1, dtype=torch.long))
        # not persistent: checkpoints written before it load unchanged
        self.register_buffer(
            "death_id", torch.tensor(vocab[DEATH] if vocab is not None else -1, dtype=torch.long), persistent=False
        )

    def forward(self, h: Tensor, input_ids: Tensor, labels: Tensor, times: Tensor, cu_seqlens: Tensor) -> LossSum:
        """Binary cross-entropy summed over classes and uncensored `[VE]`s, per `[VE]` plus positive.

        Dividing by the positives too keeps the loss on one scale whether a data set records two
        codes a year or twenty (a plain per-`[VE]` sum grows with code density and then drowns
        the next-token loss); each `[VE]` counts once so a window with no event still weighs.
        """
        idx, target = future_code_targets(
            input_ids, labels, times, cu_seqlens, self.ve_id, self.classes, self.horizon_s, self.n_codes, self.death_id
        )
        logits = self.proj(h[idx]).float()
        total = F.binary_cross_entropy_with_logits(logits, target, reduction="sum")
        return LossSum(total, len(idx) + target.sum().long())


def token_accuracy(logits: Tensor, labels: Tensor, token_kind: Tensor) -> dict[str, tuple[Tensor, Tensor]]:
    """(correct, count) of argmax predictions for code targets and for time-token targets."""
    valid = labels != IGNORE_INDEX
    kind = token_kind[labels.clamp(min=0)]
    hit = (logits.argmax(-1) == labels) & valid
    code = valid & (kind == KINDS.index("code"))
    time = valid & ((kind == KINDS.index("gap")) | (kind == KINDS.index("inpatient_time")))
    return {"acc_code": ((hit & code).sum(), code.sum()), "acc_time": ((hit & time).sum(), time.sum())}
