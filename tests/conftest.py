"""Shared fixtures: compose the real Hydra configs with tiny overrides, and locate ../shared/data."""

from __future__ import annotations

from pathlib import Path

import pytest
from hydra import compose, initialize_config_dir
from omegaconf import DictConfig

from cehrx.cli import config_dir

REPO = Path(__file__).resolve().parent.parent
SHARED_DATA = REPO.parent / "shared" / "data"


def compose_cfg(*overrides: str) -> DictConfig:
    """The config `cehrx <overrides>` would run with."""
    with initialize_config_dir(config_dir=config_dir(), version_base="1.3"):
        return compose("config", overrides=list(overrides))


def shared_data(name: str) -> Path:
    """A public data set from ../shared/data, or skip with the reason (a user's fresh clone lacks it)."""
    path = SHARED_DATA / name
    if not path.exists():
        pytest.skip(f"{path} not found: the shared public data sets are only beside the project in CI/dev")
    return path
