"""Training logs that survive a resume: shared by pretrain and finetune (both resume from `last.ckpt`).

A requeued or killed run restarts from its checkpoint; Lightning's CSV logger would delete the
first run's `metrics.csv` and drop the rows it had not flushed. `ResumableCSVLogger` appends,
`FlushLogsAtCheckpoint` flushes whenever a checkpoint is written.
"""

from __future__ import annotations

import csv

import lightning as L
from lightning.fabric.loggers.logger import rank_zero_experiment
from lightning.pytorch.callbacks import Callback
from lightning.pytorch.loggers import CSVLogger
from lightning.pytorch.loggers.csv_logs import ExperimentWriter


class FlushLogsAtCheckpoint(Callback):
    """Write the loggers' buffered rows whenever a checkpoint is written.

    The CSV logger keeps rows in memory between flushes (`flush_logs_every_n_steps`). A job killed
    between two flushes (a SLURM requeue or preemption, a crash) would lose them, while its resumed
    copy restarts from the checkpoint: the loss curve would have a hole before the resume point.
    Flushed here, the log holds every step up to the checkpoint; steps between the checkpoint and
    the kill appear twice (the resumed run logs them again).
    """

    def on_save_checkpoint(self, trainer: L.Trainer, pl_module: L.LightningModule, checkpoint: dict) -> None:
        for logger in trainer.loggers:
            logger.save()


class _AppendingWriter(ExperimentWriter):
    """Lightning's CSV writer that keeps an existing `metrics.csv` and starts from its columns."""

    def __init__(self, log_dir: str) -> None:
        super().__init__(log_dir)
        if self._fs.isfile(self.metrics_file_path):
            with self._fs.open(self.metrics_file_path, "r", newline="") as f:
                self.metrics_keys = sorted(next(csv.reader(f), []))

    def _check_log_dir_exists(self) -> None:
        """Lightning's version deletes the existing metrics.csv here."""


class ResumableCSVLogger(CSVLogger):
    """`CSVLogger` that appends to the `metrics.csv` of the run it resumes (`logger=csv`).

    Lightning's writer deletes an existing metrics.csv when it starts, so a resumed run (a requeued
    SLURM job) would lose the loss curve of the steps before the resume. This writer keeps the file,
    starts from its header and appends (a new column rewrites the file with every row kept).
    """

    @property
    @rank_zero_experiment
    def experiment(self) -> ExperimentWriter:
        if self._experiment is None:
            self._fs.makedirs(self.root_dir, exist_ok=True)
            self._experiment = _AppendingWriter(log_dir=self.log_dir)
        return self._experiment
