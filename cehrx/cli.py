"""The single Hydra entry point: `cehrx task=<name> ...` dispatches to `cehrx.tasks.<name>.run`."""

from __future__ import annotations

import logging
import os
import sys

import hydra
from hydra.core.hydra_config import HydraConfig
from hydra.types import RunMode
from omegaconf import DictConfig, OmegaConf, open_dict

from cehrx.configs import config_dir  # also registers the config resolvers (cehrx.configs)
from cehrx.errors import CehrxError
from cehrx.meds_dev import translate

log = logging.getLogger("cehrx")


@hydra.main(version_base="1.3", config_path=config_dir(), config_name="config")
def app(cfg: DictConfig) -> object:
    # one stable output dir per sweep job, except prepare's shard and stage jobs, which all feed one output
    one_output = OmegaConf.select(cfg, "task.shard") is not None or OmegaConf.select(cfg, "task.stage") is not None
    if HydraConfig.get().mode == RunMode.MULTIRUN and not one_output:
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
