"""`cehrx task=pretrain`: train a `GPT` on a prepared dir, then export a self-contained model.

Output (`output_dir`, default `<prepared_dir>/model`, stable so a requeue finds it again):

    config.yaml               resolved config of the run (vocab_size filled in)
    checkpoints/last.ckpt     latest state (resume with `ckpt_path=last`)
    checkpoints/best.ckpt     lowest val/loss
    logs/metrics.csv          csv logger (default)
    metrics.json              final validation metrics of the exported weights + unigram baseline
    model/                    the exported model (`cehrx.model.export`): what probe, zeroshot
                              and generate load with `load_pretrained(output_dir)`

Everything is built from the config with `hydra.utils.instantiate`: `model` (GPTConfig),
`task.datamodule`, `task.module`, `trainer`, `callbacks`, `logger`.
"""

from __future__ import annotations

import json
import shutil
import sys
import time
from pathlib import Path
from typing import Any

import lightning as L
from hydra.utils import instantiate
from lightning.pytorch.callbacks import (
    Callback,
    LearningRateMonitor,
    ModelCheckpoint,
    ProgressBar,
    RichProgressBar,
    TQDMProgressBar,
)
from lightning.pytorch.strategies import FSDPStrategy
from lightning.pytorch.utilities import rank_zero_only
from omegaconf import DictConfig, OmegaConf, open_dict

from cehrx.data.atomic import write_text
from cehrx.data.vocab import Vocab
from cehrx.errors import CehrxError
from cehrx.model.export import MODEL_SUBDIR, checkpoint_step, export_checkpoint
from cehrx.model.logs import FlushLogsAtCheckpoint, ResumableCSVLogger, wandb_run_id  # noqa: F401 (ResumableCSVLogger: the old config target)
from cehrx.tasks.scaffold import guard, is_finished, recover_output

CKPT_SUBDIR = "checkpoints"


def progress_bar(refresh_rate: int = 1, plain_refresh_rate: int = 50) -> ProgressBar:
    """Rich progress bar on a terminal; a plain tqdm bar (refreshed rarely) in logs and batch jobs."""
    if sys.stderr.isatty():
        return RichProgressBar(refresh_rate=refresh_rate)
    return TQDMProgressBar(refresh_rate=plain_refresh_rate)


class FinalCheckpoint(Callback):
    """Write `checkpoints/last.ckpt` when training ends, in the training processes themselves.

    Whatever the checkpoint callbacks' intervals, a finished run can be resumed or exported
    from its true end state; saving here (not after `fit` returns) also works with spawned
    workers, whose trainer state never comes back to the launching process.
    """

    def __init__(self, path: str | Path) -> None:
        self.path = str(path)

    def on_train_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        trainer.save_checkpoint(self.path)


class CloseSpawnedProcessGroup(Callback):
    """In workers started by `ddp_spawn`, close the process group when a stage ends.

    Lightning leaves a gloo group open when a spawned worker exits (it only destroys NCCL groups at
    exit). Its threads then die in the interpreter's shutdown in whatever order, which now and then
    aborts a worker (SIGABRT) after its work is done: a finished run reported as failed (seen once in
    CI). Both ranks meet at a barrier, then close the group, then exit. Workers of other launchers
    keep their group: they run the final validation in the same processes.
    """

    def teardown(self, trainer: L.Trainer, pl_module: L.LightningModule, stage: str) -> None:
        import torch.distributed as dist
        from lightning.pytorch.strategies.launchers.multiprocessing import _MultiProcessingLauncher

        if not isinstance(trainer.strategy.launcher, _MultiProcessingLauncher) or not dist.is_initialized():
            return
        dist.barrier()
        dist.destroy_process_group()


def resolve_ckpt_path(value: str | None, output_dir: Path) -> str | None:
    """`last` / `best` -> `<output_dir>/checkpoints/<name>.ckpt`; any other value is a path. Must exist.

    `auto` resumes from `last.ckpt` when there is one and starts afresh otherwise: what a SLURM
    job needs, since its requeued copy runs the very same command line. Starting afresh, `run`
    removes what a run killed before its first `last.ckpt` left (a `best.ckpt`, logs).
    """
    if value in (None, "", "null"):
        return None
    if value == "auto":
        last = output_dir / CKPT_SUBDIR / "last.ckpt"
        return str(last) if last.exists() else None
    path = output_dir / CKPT_SUBDIR / f"{value}.ckpt" if value in ("last", "best") else Path(str(value))
    if not path.exists():
        raise CehrxError(
            f"ckpt_path={value}: no checkpoint at {path} (nothing to resume; drop ckpt_path to start a new run)"
        )
    return str(path)


def check_inputs(prepared_dir: Path) -> Path:
    """The prepared dir's vocab.json, or a one-line error saying what is missing."""
    if not prepared_dir.is_dir():
        raise CehrxError(
            f"prepared dir {prepared_dir} does not exist: run `cehrx task=prepare` first (or set data.prepared_dir)"
        )
    vocab = prepared_dir / "vocab.json"
    if not vocab.is_file():
        raise CehrxError(f"{vocab} not found: {prepared_dir} is not a finished prepared dir (run `cehrx task=prepare`)")
    if not (prepared_dir / "tokens" / "train").is_dir():
        raise CehrxError(
            f"{prepared_dir / 'tokens' / 'train'} not found: {prepared_dir} has no token shards (run `cehrx task=prepare`)"
        )
    return vocab


def guard_output(out: Path, overwrite: bool, resuming: bool, restart: bool = False) -> None:
    """Refuse to clobber a finished model or an unfinished run's checkpoints without overwrite=true.

    `restart` (`ckpt_path=auto` with no `last.ckpt`): the checkpoints there are of a run killed
    before it wrote one (a `best.ckpt` comes at the first validation, `last.ckpt` only every
    `callbacks.last.every_n_train_steps`): nothing to resume, so they go, as with overwrite.
    A fresh start also drops the logs of a run that left no checkpoint (the appending CSV logger
    would otherwise log its steps twice)."""
    guard("pretrain", out, overwrite)
    if resuming:
        return
    ckpts = out / CKPT_SUBDIR
    if ckpts.is_dir() and any(ckpts.iterdir()) and not (overwrite or restart):
        raise CehrxError(
            f"{ckpts} holds checkpoints of an earlier run: resume with ckpt_path=last, or pass overwrite=true to start over"
        )
    if rank_zero_only.rank == 0:
        for sub in (CKPT_SUBDIR, "logs"):
            shutil.rmtree(out / sub, ignore_errors=True)


def fill_vocab_size(cfg: DictConfig, vocab: Vocab, vocab_path: Path) -> None:
    """Set `model.vocab_size` from vocab.json (an explicit, different value is an error)."""
    given = cfg.model.get("vocab_size")
    if given not in (None, len(vocab)):
        raise CehrxError(
            f"model.vocab_size={given} but {vocab_path} has {len(vocab)} tokens: leave model.vocab_size=null"
        )
    with open_dict(cfg):
        cfg.model.vocab_size = len(vocab)


def build_callbacks(cfg: DictConfig) -> list[Callback]:
    """Instantiate `callbacks.*`, minus those the rest of the config switched off.

    Progress bars go when the trainer disables them; the learning-rate monitor goes with
    `logger=none` (it has nowhere to write and Lightning refuses it).
    """
    cbs = [instantiate(c) for c in (cfg.get("callbacks") or {}).values() if c is not None and "_target_" in c]
    if not cfg.trainer.get("enable_progress_bar", True):
        cbs = [c for c in cbs if not isinstance(c, ProgressBar)]
    if not (cfg.get("logger") and "_target_" in cfg.logger):
        cbs = [c for c in cbs if not isinstance(c, LearningRateMonitor)]
    return cbs


def run(cfg: DictConfig) -> dict[str, Any]:
    """Train, validate the weights that get exported, export them; returns the final metrics."""
    prepared = Path(cfg.data.prepared_dir)
    vocab_path = check_inputs(prepared)
    out = Path(cfg.output_dir)
    if rank_zero_only.rank == 0:
        recover_output("pretrain", out)  # a model export killed between its two renames
    if cfg.get("ckpt_path") == "auto" and is_finished("pretrain", out) and not cfg.overwrite:
        print(f"cehrx: {out} already holds a finished model; nothing to resume (ckpt_path=auto)")
        return json.loads((out / "metrics.json").read_text()) if (out / "metrics.json").is_file() else {}
    ckpt_path = resolve_ckpt_path(cfg.get("ckpt_path"), out)
    resuming = ckpt_path is not None
    guard_output(out, bool(cfg.overwrite), resuming, restart=cfg.get("ckpt_path") == "auto")
    vocab = Vocab.load(vocab_path)
    fill_vocab_size(cfg, vocab, vocab_path)
    L.seed_everything(int(cfg.seed), workers=True)
    set_wandb_run_id(cfg, out, resuming)
    if rank_zero_only.rank == 0:
        write_text(out / "config.yaml", OmegaConf.to_yaml(cfg, resolve=True))
    datamodule, module, trainer = build(cfg, vocab, out / CKPT_SUBDIR / "last.ckpt")
    start = time.perf_counter()
    trainer.fit(module, datamodule=datamodule, ckpt_path=ckpt_path)
    return finish(cfg, trainer, module, datamodule, time.perf_counter() - start, vocab_path)


def set_wandb_run_id(cfg: DictConfig, out: Path, resuming: bool) -> None:
    """`logger=wandb` with no `logger.id`: a resumed run continues the W&B run of the run it resumes
    (`cehrx.model.logs.wandb_run_id`, with `resume: allow`); a fresh start (or overwrite) opens a new one."""
    logger = cfg.get("logger") or {}
    if str(logger.get("_target_", "")).rsplit(".", 1)[-1] != "WandbLogger" or logger.get("id"):
        return
    with open_dict(cfg):
        cfg.logger.id = wandb_run_id(out / "logs", resuming, write=rank_zero_only.rank == 0)


def build(cfg: DictConfig, vocab: Vocab, final_ckpt: Path) -> tuple[Any, Any, L.Trainer]:
    """(datamodule, LightningModule, Trainer) from the config groups."""
    gpt_config = instantiate(cfg.model, _convert_="all")
    datamodule = instantiate(cfg.task.datamodule)
    module = instantiate(cfg.task.module, _partial_=True, _convert_="all")(
        model_config=gpt_config.to_dict(), vocab=vocab
    )
    logger = instantiate(cfg.logger) if cfg.get("logger") and "_target_" in cfg.logger else False
    callbacks = [
        *build_callbacks(cfg),
        FinalCheckpoint(final_ckpt),
        FlushLogsAtCheckpoint(),
        CloseSpawnedProcessGroup(),
    ]
    trainer: L.Trainer = instantiate(cfg.trainer, callbacks=callbacks, logger=logger)
    if not isinstance(trainer.strategy, FSDPStrategy):
        # Build the backbone here unless FSDP must build it sharded: with spawn-based launchers
        # the weights only come back to this process if it holds the modules to load them into.
        module.configure_model()
    return datamodule, module, trainer


def finish(
    cfg: DictConfig, trainer: L.Trainer, module: Any, datamodule: Any, fit_s: float, vocab_path: Path
) -> dict[str, Any]:
    """Validate the weights to export (all ranks), then on rank 0 export them and write metrics.json."""
    out = Path(cfg.output_dir)
    final = out / CKPT_SUBDIR / "last.ckpt"
    source = _export_source(trainer, str(final), str((cfg.task.get("export") or {}).get("weights", "best")))
    results = trainer.validate(module, datamodule=datamodule, ckpt_path=source, verbose=False)
    if not trainer.is_global_zero:
        return {}
    metrics = {k: float(v) for k, v in (results[0] if results else {}).items()}
    metrics.update(_summary(trainer, module, datamodule, fit_s, source, checkpoint_step(final)))
    for lg in trainer.loggers:
        lg.log_metrics({"val/unigram_ppl": metrics["unigram_ppl"]}, step=metrics["global_step"])
        lg.save()
        if type(lg).__name__ == "WandbLogger":  # close the W&B run: a later run in this process opens its own
            lg.experiment.finish()
    # metrics.json first: the export holds the marker (model/config.json), so a run killed in between
    # is not finished and the rerun (ckpt_path=auto) validates and exports again
    write_text(out / "metrics.json", json.dumps(metrics, indent=2) + "\n")
    export_checkpoint(
        source, out / MODEL_SUBDIR, vocab_path, train_config=cfg, overwrite=True, info={"metrics": metrics}
    )
    _report(metrics, out)
    return metrics


def _export_source(trainer: L.Trainer, final: str, which: str) -> str:
    """The checkpoint to export: the best by val/loss when asked and available, else the final one."""
    if which not in ("best", "last"):
        raise CehrxError(f"task.export.weights must be 'best' or 'last', got {which!r}")
    if which == "best":
        for cb in trainer.checkpoint_callbacks:
            if (
                isinstance(cb, ModelCheckpoint)
                and cb.monitor
                and cb.best_model_path
                and Path(cb.best_model_path).exists()
            ):
                return cb.best_model_path
    return final


def _summary(trainer: L.Trainer, module: Any, datamodule: Any, fit_s: float, source: str, step: int) -> dict[str, Any]:
    # Counted by the module in this process: unknown (None) when training ran in spawned workers.
    n_tokens = getattr(module, "tokens_seen", 0) * trainer.world_size or None
    return {
        "unigram_ppl": datamodule.unigram_perplexity(),
        "global_step": step,
        "fit_seconds": round(fit_s, 1),
        "train_tokens": n_tokens,
        "train_tokens_per_s": round(n_tokens / max(fit_s, 1e-9), 1) if n_tokens else None,
        "exported_checkpoint": source,
    }


def _report(metrics: dict[str, Any], out: Path) -> None:
    line = (
        f"pretrain: step {metrics['global_step']}, val/loss {metrics.get('val/loss', float('nan')):.4f}, "
        f"val/ppl {metrics.get('val/ppl', float('nan')):.2f} (unigram baseline {metrics['unigram_ppl']:.2f}), "
        f"{metrics['train_tokens_per_s'] or 0:.0f} tokens/s, {metrics['fit_seconds']:.0f}s -> {out / MODEL_SUBDIR}"
    )
    print(line, file=sys.stderr)
