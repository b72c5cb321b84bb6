"""Where the Hydra configs live, for the CLI and for library code that reads them (model sizes,
ACES task files), so that nothing in the library imports `cehrx.cli`."""

from __future__ import annotations

from importlib import resources
from pathlib import Path


def config_dir() -> str:
    """Absolute path of the Hydra configs, so `cehrx` works from any directory and when installed.

    A source checkout (or editable install) uses the repository's `configs/`; a wheel carries
    the same files as the package data `cehrx._configs`.
    """
    repo = Path(__file__).resolve().parent.parent / "configs"
    if (repo / "config.yaml").is_file():
        return str(repo)
    return str(resources.files("cehrx._configs"))
