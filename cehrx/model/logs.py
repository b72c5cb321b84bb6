"""Training logs that survive a resume: shared by pretrain and finetune (both resume from `last.ckpt`).

A requeued or killed run restarts from its checkpoint; Lightning's CSV logger would delete the
first run's `metrics.csv` and drop the rows it had not flushed. `ResumableCSVLogger` appends,
`FlushLogsAtCheckpoint` flushes whenever a checkpoint is written, and `wandb_run_id` gives a
resumed run the Weights & Biases run id of the run it continues (`configs/logger/wandb.yaml`).
"""

from __future__ import annotations

import csv
import uuid
from pathlib import Path
from typing import Any

import lightning as L
from lightning.fabric.loggers.logger import rank_zero_experiment
from lightning.pytorch.callbacks import Callback
from lightning.pytorch.loggers import CSVLogger
from lightning.pytorch.loggers.csv_logs import ExperimentWriter

WANDB_ID_FILE = "wandb_run_id"


def wandb_run_id(log_dir: str | Path, resuming: bool, write: bool = True) -> str:
    """The W&B run id for a run logging into `log_dir`: the one stored there when `resuming`, else a new one.

    With `resume: allow` (the wandb logger config) a resumed or requeued run then continues the same
    W&B run (offline too: `wandb sync` joins the pieces), while a run that starts over (a fresh start,
    `overwrite=true`) opens a new one: W&B drops steps lower than a run's last, so a restarted run
    logged into the old id would lose its curve. `write` (rank 0) stores a new id in `log_dir`.
    """
    path = Path(log_dir) / WANDB_ID_FILE
    if resuming and path.is_file() and path.read_text().strip():
        return path.read_text().strip()
    run_id = uuid.uuid4().hex[:16]
    if write:
        from cehrx.data.atomic import write_text

        write_text(path, run_id + "\n")
    return run_id


class FlushLogsAtCheckpoint(Callback):
    """Write the loggers' rows, the checkpoint's own last step included, whenever a checkpoint is written.

    The CSV logger keeps rows in memory between flushes (`flush_logs_every_n_steps`). A job killed
    between two flushes (a SLURM requeue or preemption, a crash) would lose them, while its resumed
    copy restarts from the checkpoint: the loss curve would have a hole before the resume point.

    A step-interval checkpoint (`every_n_train_steps`) is written in `on_train_batch_end`, before
    Lightning logs that step's metrics; a kill right after it lost that one row for good (the resumed
    run starts at the next step). So a checkpoint written inside a step logs the step first; the
    loop's own row for it a moment later is the same row, which `ResumableCSVLogger` drops. Steps
    between the checkpoint and the kill appear twice (the resumed run logs them again).
    """

    def __init__(self) -> None:
        self._inside_step = False

    def on_train_batch_end(self, trainer: L.Trainer, *args: Any) -> None:
        # Lightning runs checkpoint callbacks after all others, so this is set before they save.
        self._inside_step = True

    def on_train_batch_start(self, trainer: L.Trainer, *args: Any) -> None:
        self._inside_step = False

    def on_validation_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self._inside_step = False

    def on_train_epoch_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self._inside_step = False

    def on_save_checkpoint(self, trainer: L.Trainer, pl_module: L.LightningModule, checkpoint: dict) -> None:
        if self._inside_step and trainer.training:
            # Lightning's own call, made early (no public hook runs after a step is logged but before
            # the next batch is drawn, and a later checkpoint would skip a batch on resume).
            trainer._logger_connector.update_train_step_metrics()
            self._inside_step = False
        for logger in trainer.loggers:
            logger.save()


class _AppendingWriter(ExperimentWriter):
    """Lightning's CSV writer that keeps an existing `metrics.csv` and starts from its columns."""

    def __init__(self, log_dir: str) -> None:
        super().__init__(log_dir)
        self._last_row: dict[str, Any] | None = None
        if self._fs.isfile(self.metrics_file_path):
            with self._fs.open(self.metrics_file_path, "r", newline="") as f:
                self.metrics_keys = sorted(next(csv.reader(f), []))

    def _check_log_dir_exists(self) -> None:
        """Lightning's version deletes the existing metrics.csv here."""

    def log_metrics(self, metrics_dict: dict[str, Any], step: int | None = None) -> None:
        """Lightning's, dropping a row equal to the last one (`FlushLogsAtCheckpoint` logs a step early)."""
        super().log_metrics(metrics_dict, step)
        if self.metrics[-1] == self._last_row:
            self.metrics.pop()
        else:
            self._last_row = self.metrics[-1]


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
