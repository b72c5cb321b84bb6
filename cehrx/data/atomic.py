"""Outputs appear complete or not at all: write to a temporary sibling, then rename.

A kill (SIGKILL, OOM, a node lost) runs no cleanup, so each temporary name carries the writer's
process id: the next writer of the same output removes the temporaries of dead processes, and if
a kill fell between the two renames that replace a finished output (`overwrite=true`), it puts the
new output (finished by then) in place, so the user is never left with none.
"""

from __future__ import annotations

import os
import re
import shutil
import uuid
from contextlib import contextmanager
from pathlib import Path
from typing import Iterator

from cehrx.errors import CehrxError


@contextmanager
def atomic_dir(target: str | Path, marker: str, overwrite: bool = False) -> Iterator[Path]:
    """Yield a temporary directory that replaces `target` only if the block succeeds.

    `marker` is the file whose presence means `target` is a finished output: such a target is
    never replaced unless `overwrite`. A crash leaves the previous output (or nothing) in place;
    what a killed writer left behind is cleaned up here, by the next writer (`recover`).
    """
    target = Path(target).resolve()
    target.parent.mkdir(parents=True, exist_ok=True)
    recover(target, marker)
    if (target / marker).exists() and not overwrite:
        raise CehrxError(f"{target} already holds a finished output ({marker}); pass overwrite=true to replace it")
    tmp = _sibling(target, "tmp")
    tmp.mkdir()
    try:
        yield tmp
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    old = None
    if target.exists():
        old = _sibling(target, "old")
        os.replace(target, old)
    os.replace(tmp, target)
    if old is not None:
        shutil.rmtree(old, ignore_errors=True)


@contextmanager
def atomic_file(target: str | Path) -> Iterator[Path]:
    """Yield a temporary sibling path that is renamed onto `target` only if the block succeeds.

    For single files that several runs read (caches, stores): a killed writer leaves either the
    previous file or none, never a half-written one.
    """
    target = Path(target)
    target.parent.mkdir(parents=True, exist_ok=True)
    recover(target)
    tmp = _sibling(target, "tmp")
    try:
        yield tmp
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    os.replace(tmp, target)


def recover(target: Path, marker: str | None = None) -> dict[str, int]:
    """Clean up after writers of `target` that were killed: returns what was done.

    - A kill between the two renames of an overwrite leaves no `target`, the previous output as
      `.<name>.old-<pid>-*` and the new one, complete, as `.<name>.tmp-<pid>-*` (`old` exists only
      once the block has finished). The new one goes in place if it holds `marker`, else the old one.
    - Every other `.<name>.tmp-<pid>-*` / `.<name>.old-<pid>-*` of a dead process is removed.
    Temporaries of live processes (another run writing the same output) are left alone.
    """
    done = {"restored": 0, "promoted": 0, "removed": 0}
    pattern = re.compile(rf"^\.{re.escape(target.name)}\.(tmp|old)-(\d+)-[0-9a-f]+$")
    stale: dict[tuple[str, int], list[Path]] = {}
    for p in target.parent.iterdir() if target.parent.is_dir() else []:
        m = pattern.match(p.name)
        if m and not _alive(int(m.group(2))):
            stale.setdefault((m.group(1), int(m.group(2))), []).append(p)
    if not target.exists():
        for (kind, pid), paths in stale.items():
            if kind != "old":
                continue
            new = [p for p in stale.get(("tmp", pid), []) if marker and (p / marker).is_file()]
            os.replace(new[0] if new else paths[0], target)
            done["promoted" if new else "restored"] += 1
            break
    for paths in stale.values():
        for p in paths:
            if p.exists():
                shutil.rmtree(p, ignore_errors=True) if p.is_dir() else p.unlink(missing_ok=True)
                done["removed"] += 1
    return done


def _sibling(target: Path, kind: str) -> Path:
    return target.parent / f".{target.name}.{kind}-{os.getpid()}-{uuid.uuid4().hex[:8]}"


def _alive(pid: int) -> bool:
    if pid == os.getpid():
        return True
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # another user's live process
        return True
    return True


def write_text(path: str | Path, text: str) -> Path:
    """`path` holds `text` completely or keeps what it held (see `atomic_file`)."""
    with atomic_file(path) as tmp:
        tmp.write_text(text)
    return Path(path)


def write_parquet(table, path: str | Path, **kwargs) -> Path:
    """`pyarrow.parquet.write_table` to a temporary name, then renamed onto `path`."""
    import pyarrow.parquet as pq

    with atomic_file(path) as tmp:
        pq.write_table(table, tmp, **kwargs)
    return Path(path)
