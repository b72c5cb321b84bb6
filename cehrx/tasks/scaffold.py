"""What every task does around its own work, written once: the output contract.

A task's output is a directory (`output_dir`) that is *finished* when its marker file exists.
The rules every task follows, and the pipeline relies on:

- **Refuse to clobber**: a finished output is replaced only with `overwrite=true`; `guard` checks
  it before the expensive part, `task_output` again when the result is in place.
- **Recover first**: what a killed run of the same output left behind is settled before anything
  looks at the output (`recover_output`, called by `guard`): its temporaries are removed and, when
  the kill fell between the two renames of an overwrite, the finished output is put back in place.
- **Appear at once**: the task writes into a temporary sibling (`cehrx.data.atomic.atomic_dir`),
  which replaces `output_dir` only when the block succeeds, with the resolved `config.yaml`; SLURM
  logs already in `output_dir` (`.submitit/`) are moved into it first, so they survive the replacement.
- **The marker is the summary**: `write_marker` writes the task's result JSON as the marker, last.

`OUTPUTS` names each task's marker and its folder under a `task=pipeline` root, so the pipeline
knows when a stage is done without repeating any task's file names.
"""

from __future__ import annotations

import json
import os
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterator

from omegaconf import DictConfig, OmegaConf

from cehrx.data.atomic import atomic_dir, recover, recover_tree
from cehrx.errors import CehrxError
from cehrx.model.config import MARKER as MODEL_MARKER
from cehrx.model.config import MODEL_SUBDIR


@dataclass(frozen=True)
class TaskOutput:
    marker: str  # the file (relative to output_dir) whose presence means the output is finished
    stage_dir: str  # the task's folder under a pipeline root


OUTPUTS: dict[str, TaskOutput] = {
    "prepare": TaskOutput("prepare.json", "prepared"),
    "pretrain": TaskOutput(f"{MODEL_SUBDIR}/{MODEL_MARKER}", "model"),
    "probe": TaskOutput("metrics.json", "probe"),
    "finetune": TaskOutput("metrics.json", "finetune"),
    "zeroshot": TaskOutput("metrics.json", "zeroshot"),
    "generate": TaskOutput("generate.json", "synthetic"),
    "evaluate": TaskOutput("metrics.json", "synthetic_report"),
}


# Run records that jobs write into `output_dir` (the SLURM launcher's `submitit_folder`): kept when the
# task's output replaces the directory (`keep_run_logs`).
RUN_LOGS = (".submitit",)


def marker(task: str) -> str:
    return OUTPUTS[task].marker


def is_finished(task: str, out: str | Path) -> bool:
    return (Path(out) / marker(task)).is_file()


def output_target(task: str, out: str | Path) -> tuple[Path, str]:
    """The directory that `atomic_dir` writes for `task` and its marker's name inside it: `out` itself,
    or the marker's folder (pretrain: `<out>/model`, whose export is the atomic part)."""
    m = Path(marker(task))
    return Path(out) / m.parent, m.name


def recover_output(task: str, out: str | Path) -> dict[str, int]:
    """Clean up after a killed run of `task` into `out` (`cehrx.data.atomic.recover`): remove its
    temporaries and, if the kill fell between the two renames of an overwrite, put the finished
    output (new, else old) back in place. Without it a rerun would see no output and start over,
    and a finished output would be deleted as a stale temporary. Dead temporaries inside the output
    (atomic files of its resumable `work/`) go too (`recover_tree`)."""
    target, name = output_target(task, out)
    target = target.resolve()
    if not target.parent.is_dir():
        return {"restored": 0, "promoted": 0, "removed": 0}
    done = recover(target, name)
    inner = recover_tree(out)
    return {k: done[k] + inner[k] for k in done}


def guard(task: str, out: str | Path, overwrite: bool) -> None:
    """Fail before the expensive part when `out` already holds a finished output of `task`
    (after `recover_output`: an output left hidden by a killed run counts)."""
    recover_output(task, out)
    if is_finished(task, out) and not overwrite:
        raise CehrxError(
            f"{out} already holds a finished {task} output ({marker(task)}); pass overwrite=true to replace it"
        )


@contextmanager
def task_output(cfg: DictConfig, task: str, *, overwrite: bool | None = None) -> Iterator[Path]:
    """A temporary sibling of `cfg.output_dir` to write the output into; on success the resolved
    config is added as `config.yaml` and the directory renamed into place (see the module doc).
    The block must end with `write_marker`."""
    out = Path(str(cfg.output_dir))
    with atomic_dir(out, marker(task), overwrite=bool(cfg.overwrite) if overwrite is None else overwrite) as tmp:
        yield tmp
        if not (tmp / marker(task)).is_file():
            raise CehrxError(
                f"task {task} finished without writing its marker {marker(task)}: the output would never count as finished"
            )
        (tmp / "config.yaml").write_text(OmegaConf.to_yaml(cfg, resolve=True))
        keep_run_logs(out, tmp)


def keep_run_logs(out: Path, tmp: Path) -> None:
    """Move the SLURM logs already in `out` (`RUN_LOGS`) into the output about to replace it, so that
    they outlive it: the map jobs of a sharded prepare log into the `output_dir` that the reduce then
    replaces, and a job still running (the reduce under SLURM) goes on writing to its moved log file."""
    for name in RUN_LOGS:
        if (out / name).is_dir() and not (tmp / name).exists():
            os.replace(out / name, tmp / name)


def write_marker(tmp: Path, task: str, result: Any) -> Path:
    """The task's summary JSON as its marker file (NaN and numpy values made JSON-safe)."""
    from cehrx.eval.metrics import json_safe

    path = tmp / marker(task)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(json_safe(result), indent=2, default=str) + "\n")
    return path
