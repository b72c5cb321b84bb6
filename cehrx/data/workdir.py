"""Resumable work directories: one check for "is this the same run? resume : start over only with overwrite".

A long task (generate's shards, zero-shot's chunks, a fine-tuning budget's checkpoints) keeps its
finished pieces in a work directory and skips them when it is started again. That is only safe
when the pieces were made with the same settings, so the directory records them in a JSON file:
`claim_work_dir` compares, then resumes (same settings, with or without `overwrite=true`: `overwrite`
is about replacing a finished output, and a work dir of the same settings is this run's own progress,
e.g. of an interrupted `overwrite=true` run), starts over (other settings, `overwrite=true`) or refuses
with the settings that changed. To start a matching work dir over, delete it. Settings are compared as JSON values (`default=str` for anything else), so
the file's layout (indentation, key order) does not matter.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path
from typing import Any

from cehrx.data.atomic import write_text
from cehrx.errors import CehrxError

__all__ = ["SETTINGS_FILE", "claim_work_dir"]

SETTINGS_FILE = "settings.json"


def claim_work_dir(
    work: str | Path, settings: dict[str, Any], overwrite: bool, *, what: str, settings_file: str = SETTINGS_FILE
) -> bool:
    """Make `work` the directory of the run described by `settings`; True when it resumes one.

    - `work` missing or empty: created, a fresh run.
    - `work` holds a run with the same settings: kept (resumed), with or without `overwrite`.
    - `work` holds another run's files (other settings, or no settings file): removed with
      `overwrite`, else a `CehrxError` naming the settings that changed.
    `settings_file` (inside `work`) is then written with `settings` (indented, sorted keys).
    `what` names the run in the error ("zero-shot", "generate", "fine-tuning").
    """
    work = Path(work)
    path = work / settings_file
    wanted = json.loads(json.dumps(settings, sort_keys=True, default=str))
    held = work.is_dir() and any(work.iterdir())
    if held:
        old = _read(path)
        if old == wanted:
            pass  # the same run: resumed, also under overwrite (an interrupted overwrite run's progress)
        elif overwrite:
            shutil.rmtree(work)
            held = False
        elif old is None:
            raise CehrxError(
                f"{work} holds files but no {settings_file}: not a {what} work dir; "
                "pass overwrite=true to start over, or use another output_dir"
            )
        else:
            raise CehrxError(
                f"{work} holds a different {what} run (other settings: {', '.join(changed_keys(old, wanted))}): "
                "rerun with the same settings to resume, pass overwrite=true to start over, or use another output_dir"
            )
    work.mkdir(parents=True, exist_ok=True)
    write_text(path, json.dumps(wanted, indent=2, sort_keys=True) + "\n")
    return held


def changed_keys(old: Any, new: Any) -> list[str]:
    """The top-level keys whose values differ (the whole value when either is not a dict)."""
    if not isinstance(old, dict) or not isinstance(new, dict):
        return ["(all)"]
    return sorted(k for k in set(old) | set(new) if old.get(k) != new.get(k))


def _read(path: Path) -> Any:
    if not path.is_file():
        return None
    try:
        return json.loads(path.read_text())
    except json.JSONDecodeError:
        return None
