"""Outputs appear complete or not at all: write to a temporary sibling, then rename."""

from __future__ import annotations

import os
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
    never replaced unless `overwrite`. A crash leaves the previous output (or nothing) in place
    and removes the temporary directory.
    """
    target = Path(target).resolve()
    if (target / marker).exists() and not overwrite:
        raise CehrxError(f"{target} already holds a finished output ({marker}); pass overwrite=true to replace it")
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = target.parent / f".{target.name}.tmp-{uuid.uuid4().hex[:8]}"
    tmp.mkdir()
    try:
        yield tmp
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    old = None
    if target.exists():
        old = target.parent / f".{target.name}.old-{uuid.uuid4().hex[:8]}"
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
    tmp = target.parent / f".{target.name}.tmp-{uuid.uuid4().hex[:8]}"
    try:
        yield tmp
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    os.replace(tmp, target)
