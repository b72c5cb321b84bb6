"""Training logs across a kill: a checkpoint on disk means every step it covers is in metrics.csv."""

from __future__ import annotations

import csv
from pathlib import Path

import lightning as L
from lightning.pytorch.callbacks import ModelCheckpoint
from lightning.pytorch.demos.boring_classes import BoringModel

from cehrx.model.logs import FlushLogsAtCheckpoint, ResumableCSVLogger


class LoggingModel(BoringModel):
    def training_step(self, batch, batch_idx):
        out = super().training_step(batch, batch_idx)
        self.log("train/loss", out["loss"])
        return out


def logged_steps(path: Path) -> list[int]:
    if not path.exists():
        return []
    with path.open() as f:
        return [int(r["step"]) for r in csv.DictReader(f) if r.get("train/loss")]


class RecordingCheckpoint(ModelCheckpoint):
    """Reads metrics.csv the moment each checkpoint is on disk (where a SIGKILL could land)."""

    def __init__(self, metrics: Path, **kw) -> None:
        super().__init__(**kw)
        self.metrics, self.seen = metrics, {}

    def _save_checkpoint(self, trainer: L.Trainer, filepath: str) -> None:
        super()._save_checkpoint(trainer, filepath)
        self.seen[trainer.global_step] = logged_steps(self.metrics)


def test_a_step_checkpoint_follows_its_own_step_into_the_log(tmp_path: Path) -> None:
    logger = ResumableCSVLogger(str(tmp_path), name="", version="", flush_logs_every_n_steps=1000)
    metrics = Path(logger.log_dir) / "metrics.csv"
    ckpt = RecordingCheckpoint(metrics, dirpath=tmp_path / "ckpt", every_n_train_steps=4, save_top_k=-1)
    trainer = L.Trainer(
        accelerator="cpu",
        max_steps=12,
        log_every_n_steps=1,
        limit_val_batches=0,
        logger=logger,
        callbacks=[FlushLogsAtCheckpoint(), ckpt],
        enable_progress_bar=False,
        enable_model_summary=False,
    )
    trainer.fit(LoggingModel())
    # the checkpoint at global step 4 resumes at step 4: steps 0-3 must already be on disk
    assert {s: sorted(set(v)) for s, v in ckpt.seen.items()} == {n: list(range(n)) for n in (4, 8, 12)}
    assert logged_steps(metrics) == list(range(12)), "each step logged once: the early row is not repeated"
