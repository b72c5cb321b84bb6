"""One fine-tuning run (one training budget), resumable in its own work directory.

`<work>/checkpoints/last.ckpt` is written every epoch and `best.ckpt` whenever the tuning AUROC
improves; a rerun resumes from `last.ckpt` (optimizer, scheduler, early-stopping state included).
When the budget is done, `<work>/result.json` + `test.npz` record its held-out predictions, and
a later rerun reads them instead of training again. A work directory made with other settings is
refused (`settings.json`), unless `overwrite=true`. With `finetune.wise_alphas` the best checkpoint is
blended with the start's weights before scoring (`wise_ft`).
"""

from __future__ import annotations

import copy
import hashlib
import json
import math
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import lightning as L
import numpy as np
import torch
from lightning.pytorch.callbacks import EarlyStopping, ModelCheckpoint
from omegaconf import DictConfig, OmegaConf

from cehrx.data.atomic import atomic_file, write_text
from cehrx.data.workdir import claim_work_dir
from cehrx.finetune.data import LabelledHistories, loader
from cehrx.finetune.model import SequenceClassifier, apply_lora, parameter_counts
from cehrx.finetune.module import FinetuneModule, predict_logits
from cehrx.model.export import resolve_device
from cehrx.model.logs import FlushLogsAtCheckpoint, ResumableCSVLogger

RESULT, PREDICTIONS, SETTINGS = "result.json", "test.npz", "settings.json"


@dataclass
class BudgetResult:
    train_rows: np.ndarray
    probs: np.ndarray  # P(y) for the test rows, in their order
    info: dict[str, Any]
    best_ckpt: Path


def train_budget(
    cfg: DictConfig,
    model,
    cohort,
    train_rows: np.ndarray,
    rows: dict,
    work: Path,
    head: tuple[np.ndarray, float] | None,
) -> BudgetResult:
    """Fine-tune a copy of `model` on `train_rows`, early-stopped on `rows["tuning"]`; score `rows["test"]`."""
    f = cfg.finetune
    check_wise_alphas(f.get("wise_alphas"))  # before training, not after
    claim(work, budget_settings(cfg, train_rows, rows), bool(cfg.overwrite))
    if (work / RESULT).is_file():
        info = json.loads((work / RESULT).read_text())
        return BudgetResult(train_rows, np.load(work / PREDICTIONS)["probs"], info, work / "checkpoints" / "best.ckpt")
    start = time.perf_counter()
    y = cohort.y
    train_dl = loader(
        LabelledHistories(cohort.hist, y, train_rows), int(f.batch_tokens), shuffle=True, seed=int(f.seed)
    )
    tune_dl = loader(LabelledHistories(cohort.hist, y, rows["tuning"]), int(f.batch_tokens), shuffle=False)
    module = build_module(
        f, model, str(cfg.probe.pooling), y[train_rows], head, int(f.epochs) * len(train_dl.batch_sampler)
    )
    start_state = (  # the LP-FT start, for WiSE-FT's blend
        {k: v.detach().clone() for k, v in module.classifier.state_dict().items()} if f.get("wise_alphas") else None
    )
    monitor = "val_auroc" if 0 < y[rows["tuning"]].sum() < len(rows["tuning"]) else "val_loss"
    trainer, ckpt = build_trainer(cfg, work, monitor, len(train_dl.batch_sampler))
    last = work / "checkpoints" / "last.ckpt"
    trainer.fit(module, train_dl, tune_dl, ckpt_path=str(last) if last.is_file() else None)
    best = Path(ckpt.best_model_path or last)
    kept = torch.load(best, map_location="cpu", weights_only=False)  # read once: weights and position
    module.load_state_dict(kept["state_dict"])
    device = _device(str(cfg.trainer.accelerator))
    wise = None
    if f.get("wise_alphas"):
        wise = wise_ft(module.classifier, start_state, [float(a) for a in f.wise_alphas], tune_dl, y, device)
    test_dl = loader(LabelledHistories(cohort.hist, y, rows["test"]), int(f.batch_tokens), shuffle=False)
    order, logits = predict_logits(module.classifier, test_dl, device)
    probs = np.empty(len(order))
    probs[np.searchsorted(rows["test"], order)] = module.probabilities(logits)
    info = {
        "best_epoch": int(kept.get("epoch", -1)),
        "best_step": int(kept.get("global_step", -1)),
        "best_val": float(ckpt.best_model_score) if ckpt.best_model_score is not None else float("nan"),
        "monitor": monitor,
        "epochs_run": int(trainer.current_epoch),
        "steps_per_epoch": len(train_dl.batch_sampler),
        "pos_weight": float(module.pos_weight),
        "lr": module.lr,
        "parameters": parameter_counts(module.classifier),
        "seconds": round(time.perf_counter() - start, 1),
        "train_tokens_per_epoch": int(cohort.hist.lengths()[train_rows].sum()),
        "head_init": "probe" if head is not None else "zeros",
    }
    if wise is not None:
        info["wise_ft"] = wise
    with atomic_file(work / PREDICTIONS) as tmp:
        with open(tmp, "wb") as fh:
            np.savez(fh, probs=probs)
    write_text(work / RESULT, json.dumps(info, indent=2) + "\n")  # last: its presence means the budget is done
    return BudgetResult(train_rows, probs, info, best)


def check_wise_alphas(alphas) -> None:
    if alphas and not all(0.0 <= float(a) <= 1.0 for a in alphas):
        raise ValueError(f"finetune.wise_alphas={list(alphas)}: each must lie in [0, 1]")


def wise_ft(
    classifier: torch.nn.Module,
    start: dict[str, torch.Tensor],
    alphas: list[float],
    tune_dl,
    y: np.ndarray,
    device: torch.device,
) -> dict[str, Any]:
    """WiSE-FT (Wortsman et al. 2022, arXiv 2109.01903): blend the fine-tuned weights with the start's,
    `(1 - a) * start + a * tuned`, and keep the `a` of the best tuning AUROC (ties: the larger `a`).

    Why: fine-tuning a small model on a few thousand labels overfits within an epoch; `a = 0` is the
    LP-FT start (the linear probe fitted on the same training labels, on the pretrained backbone), so
    the chosen blend's tuning AUROC is never below that probe's, and in between it can beat both ends.
    Leaves `classifier` holding the chosen blend.
    """
    from sklearn.metrics import roc_auc_score

    check_wise_alphas(alphas)
    tuned = {k: v.detach().clone() for k, v in classifier.state_dict().items()}

    def blend(a: float) -> None:
        classifier.load_state_dict(
            {k: (1 - a) * start[k].to(v) + a * v if v.is_floating_point() else v for k, v in tuned.items()}
        )

    scores = []
    for a in alphas:
        blend(a)
        order, logits = predict_logits(classifier, tune_dl, device)
        yt = y[order].astype(bool)
        scores.append(float(roc_auc_score(yt, logits.numpy())) if 0 < yt.sum() < len(yt) else float("nan"))
    valid = [i for i, sc in enumerate(scores) if not math.isnan(sc)]
    best = max(valid, key=lambda i: (scores[i], alphas[i])) if valid else int(np.argmax(alphas))
    blend(alphas[best])
    return {"alphas": alphas, "tuning_auroc": scores, "alpha": alphas[best]}


def budget_settings(cfg: DictConfig, train_rows: np.ndarray, rows: dict) -> dict:
    """What a budget's checkpoints depend on: a work dir made with other settings is not resumed."""
    f = OmegaConf.to_container(cfg.finetune, resolve=True)
    for key in ("few_shot", "n_boot", "progress"):  # what changes no weight
        f.pop(key, None)
    return {
        "finetune": f,
        "pooling": str(cfg.probe.pooling),
        "rows": _digest(train_rows, rows["tuning"], rows["test"]),
        "trainer": [str(cfg.trainer.accelerator), str(cfg.trainer.precision)],
    }


def build_module(f, model, pooling: str, y_train: np.ndarray, head, steps: int) -> FinetuneModule:
    """A fresh copy of the pretrained model with its head (from the probe when given), LoRA if asked."""
    n_pos = int(y_train.sum())
    pos_weight = (len(y_train) - n_pos) / max(n_pos, 1) if str(f.class_weight) == "balanced" else 1.0
    classifier = SequenceClassifier(copy.deepcopy(model).train(), pooling)
    if head is not None:
        classifier.init_head(head[0], head[1] + math.log(pos_weight))  # the weighted loss's optimum sits log(w) higher
    if str(f.method) == "lora":
        apply_lora(classifier, int(f.lora.rank), float(f.lora.alpha), float(f.lora.dropout), str(f.lora.targets))
    lr = float(f.lr if f.lr is not None else (1e-3 if str(f.method) == "lora" else 1e-4))
    return FinetuneModule(
        classifier,
        lr=lr,
        head_lr=float(f.head_lr),
        weight_decay=float(f.weight_decay),
        warmup_steps=int(float(f.warmup_fraction) * steps),
        total_steps=steps,
        pos_weight=pos_weight,
        l2sp=float(f.get("l2sp", 0.0) or 0.0),
    )


def build_trainer(cfg: DictConfig, work: Path, monitor: str, steps_per_epoch: int) -> tuple[L.Trainer, ModelCheckpoint]:
    """One device (the trainer group's accelerator and precision), best and last checkpoints, early stopping."""
    f = cfg.finetune
    mode = "max" if monitor == "val_auroc" else "min"
    ckpt = ModelCheckpoint(
        dirpath=work / "checkpoints",
        filename="best",
        monitor=monitor,
        mode=mode,
        save_top_k=1,
        save_last=True,
        enable_version_counter=False,
    )
    stop = EarlyStopping(monitor=monitor, mode=mode, patience=int(f.patience))
    L.seed_everything(int(f.seed), workers=True, verbose=False)
    trainer = L.Trainer(
        accelerator=str(cfg.trainer.accelerator),
        devices=1,
        precision=cfg.trainer.precision,
        max_epochs=int(f.epochs),
        val_check_interval=val_check_interval(f.get("checks_per_epoch", 1)),
        callbacks=[ckpt, stop, FlushLogsAtCheckpoint()],
        logger=ResumableCSVLogger(str(work), name="", version=""),
        default_root_dir=str(work),
        enable_progress_bar=bool(f.progress),
        enable_model_summary=False,
        num_sanity_val_steps=0,
        gradient_clip_val=1.0,
        log_every_n_steps=max(1, min(10, steps_per_epoch)),
        use_distributed_sampler=False,
    )
    return trainer, ckpt


def val_check_interval(checks_per_epoch) -> float:
    """Lightning's `val_check_interval` for `checks_per_epoch` tuning checks an epoch.

    Why more than one: fine-tuning a small model on a few thousand labels peaks inside the first epoch
    (experiments/finetune/RESULTS.md), and one check an epoch cannot find that peak. Lightning checks
    every `max(1, int(steps_per_epoch / n))` batches of an epoch, so at least n times; where that does
    not divide the epoch, its last few batches are trained but first checked inside the next epoch.
    """
    n = int(checks_per_epoch)
    if n < 1 or n != float(checks_per_epoch):
        raise ValueError(f"finetune.checks_per_epoch={checks_per_epoch}: must be a whole number >= 1")
    return 1.0 if n == 1 else 1.0 / n


def _device(accelerator: str) -> torch.device:
    """The device the Trainer trained on, for the held-out pass."""
    name = {"gpu": "cuda", "cuda": "cuda", "cpu": "cpu"}.get(accelerator, "auto")
    return resolve_device(name, "trainer.accelerator")


def _digest(*arrays: np.ndarray) -> str:
    h = hashlib.sha256()
    for a in arrays:
        h.update(np.ascontiguousarray(a, dtype=np.int64).tobytes())
        h.update(b"|")
    return h.hexdigest()[:16]


def claim(work: Path, settings: dict, overwrite: bool) -> None:
    """Make `work` the directory of the run described by `settings`: resume it when they match (also
    under `overwrite`), else start over with `overwrite`, refuse otherwise (checkpoints of other settings must not be mixed in)."""
    claim_work_dir(work, settings, overwrite, what="fine-tuning", settings_file=SETTINGS)
