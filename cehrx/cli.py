"""The single Hydra entry point: `cehrx task=<name> ...` dispatches to `cehrx.tasks.<name>.run`."""

from __future__ import annotations

import hashlib
import logging
import os
import sys

import hydra
from hydra.core.hydra_config import HydraConfig
from hydra.types import RunMode
from omegaconf import DictConfig, OmegaConf, open_dict

from cehrx.configs import config_dir
from cehrx.errors import CehrxError
from cehrx.meds_dev import translate

log = logging.getLogger("cehrx")
MAX_JOB_DIRNAME = 160  # characters of a sweep job's directory name (see job_dirname)


def gpus_per_node(accelerator: str, devices: object) -> object:
    """SLURM GPUs per node for a trainer (`hydra/launcher=slurm`): none for a CPU trainer, whose
    `devices` counts processes, not GPUs (a CPU job asking for GPUs never starts on a CPU partition)."""
    return 0 if str(accelerator) == "cpu" else devices


def job_dirname(overrides: str) -> str:
    """A sweep job's directory name (`hydra.sweep.subdir`): its overrides (`model.lr=0.001,trainer.max_steps=9`),
    `/` made `_`; past `MAX_JOB_DIRNAME` characters, their start plus a hash of them all. File systems
    refuse names over 255 bytes, and the name must come out the same when a requeued job looks for it."""
    name = overrides.replace("/", "_")
    if len(name) <= MAX_JOB_DIRNAME:
        return name
    return f"{name[: MAX_JOB_DIRNAME - 14]}..{hashlib.sha1(name.encode()).hexdigest()[:12]}"


OmegaConf.register_new_resolver("cehrx.gpus_per_node", gpus_per_node, replace=True)
OmegaConf.register_new_resolver("cehrx.job_dirname", job_dirname, replace=True)


@hydra.main(version_base="1.3", config_path=config_dir(), config_name="config")
def app(cfg: DictConfig) -> object:
    if HydraConfig.get().mode == RunMode.MULTIRUN:  # one stable output dir per sweep job
        with open_dict(cfg):
            cfg.output_dir = HydraConfig.get().runtime.output_dir
    fn = hydra.utils.get_method(cfg.task.fn)
    try:
        return fn(cfg)
    except CehrxError as e:  # bad input: one clear line, no traceback
        print(f"cehrx: error: {e}", file=sys.stderr)
        if os.environ.get("SUBMITIT_EXECUTOR"):
            raise  # a SLURM job: submitit records the failure and the submitting `cehrx -m` exits non-zero (an exit would leave it waiting)
        sys.exit(2)


def main() -> None:
    sys.argv[1:] = translate(sys.argv[1:])
    app()
