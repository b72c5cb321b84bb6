"""The single Hydra entry point: `cehrx task=<name> ...` dispatches to `cehrx.tasks.<name>.run`."""

from __future__ import annotations

import logging
from importlib import resources
from pathlib import Path

import hydra
from omegaconf import DictConfig

log = logging.getLogger("cehrx")


def config_dir() -> str:
    """Absolute path of the Hydra configs, so `cehrx` works from any directory and when installed.

    A source checkout (or editable install) uses the repository's `configs/`; a wheel carries
    the same files as the package data `cehrx._configs`.
    """
    repo = Path(__file__).resolve().parent.parent / "configs"
    if (repo / "config.yaml").is_file():
        return str(repo)
    return str(resources.files("cehrx._configs"))


@hydra.main(version_base="1.3", config_path=config_dir(), config_name="config")
def app(cfg: DictConfig) -> object:
    fn = hydra.utils.get_method(cfg.task.fn)
    return fn(cfg)


def main() -> None:
    app()
