"""Where the Hydra configs live and the resolvers they use, for the CLI and for library code that
reads them (model sizes, ACES task files), so that nothing in the library imports `cehrx.cli`.

Resolvers (registered on import):
- `${cehrx.project_path:../shared/data/x}`: a path relative to the project root (the folder that holds
  `configs/` in a source checkout; the working directory for an installed wheel), so the data shortcuts
  (`data=gibleed`, ...) work from any directory;
- `${cehrx.gpus_per_node:accelerator,devices}`: SLURM GPUs per node, 0 for a CPU trainer;
- `${cehrx.job_dirname:overrides}`: a sweep job's directory name, short and stable.
"""

from __future__ import annotations

import hashlib
from importlib import resources
from pathlib import Path

from omegaconf import OmegaConf

MAX_JOB_DIRNAME = 160  # characters of a sweep job's directory name (see job_dirname)


def config_dir() -> str:
    """Absolute path of the Hydra configs, so `cehrx` works from any directory and when installed.

    A source checkout (or editable install) uses the repository's `configs/`; a wheel carries
    the same files as the package data `cehrx._configs`.
    """
    repo = Path(__file__).resolve().parent.parent / "configs"
    if (repo / "config.yaml").is_file():
        return str(repo)
    return str(resources.files("cehrx._configs"))


def project_path(rel: str) -> str:
    """`rel` against the project root when it is relative (see the module doc); absolute paths as given."""
    p = Path(rel)
    if p.is_absolute():
        return str(p)
    repo = Path(__file__).resolve().parent.parent
    root = repo if (repo / "configs" / "config.yaml").is_file() else Path.cwd()
    return str((root / p).resolve())


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


for _name, _fn in (("project_path", project_path), ("gpus_per_node", gpus_per_node), ("job_dirname", job_dirname)):
    OmegaConf.register_new_resolver(f"cehrx.{_name}", _fn, replace=True)
