"""Outputs appear complete or not at all: write to a temporary sibling, then rename.

A kill (SIGKILL, OOM, a node lost) runs no cleanup, so each temporary name carries the writer's
process id: the next writer of the same output removes the temporaries of dead processes, and if
a kill fell between the two renames that replace a finished output (`overwrite=true`), it puts the
new output (finished by then) in place, so the user is never left with none.

`atomic_dir` / `atomic_file` serve one writer of an output; `build_shared_dir` serves outputs that
several processes build at once from the same inputs (the token cache of a DDP run).
"""

from __future__ import annotations

import os
import re
import shutil
import uuid
from collections import Counter
from contextlib import contextmanager
from pathlib import Path
from typing import Callable, Iterator

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


def build_shared_dir(target: str | Path, is_fresh: Callable[[Path], bool], build: Callable[[Path], None]) -> bool:
    """Make `target` a directory that `is_fresh` accepts, unless it already is one: `build(tmp)` fills
    a temporary sibling, renamed onto `target`. Returns True when this call's build went in place.

    For an output that several processes may build at once from the same inputs and then read
    (the token cache, built on first use by every node and rank of a DDP run). The loser of such a
    race never breaks the winner's output:
    - A build goes in place with `os.rename`, which refuses a non-empty directory: the first builder
      to finish wins; a later one finds `target` in place, removes its own build and returns False.
      So a fresh `target` can only appear where there was none.
    - A stale `target` is moved aside (then removed) before building, not replaced after. `is_fresh`
      is checked again just before that move, so a fresh `target` is moved only if another builder
      put it in place in the instant between that check and the rename (the window is narrowed, not
      eliminated: there is no lock). Then the moved dir is fresh: it is put back and nothing is built;
      until it is back, a reader finds no `target`. A fresh dir is removed only when another fresh one
      is in place (a third builder's, which took the spot first).
    - Temporaries are named like `atomic_dir`'s (`.<name>.tmp-<pid>-*`, `.<name>.old-<pid>-*`); once
      `target` is fresh (found so, or built), `recover(..., restore=False)` removes those of dead
      processes and the pid-less `.<name>.tmp-*` / `.old-*` of earlier versions, and never puts any
      of them in place. A process id tells whether a writer lives only on its own host, so a live
      builder on another node may lose its temporary, and only a builder that has already lost (its
      build then fails, finds `target` fresh, and returns False).
    """
    target = Path(target)
    target.parent.mkdir(parents=True, exist_ok=True)
    installed = False
    if not is_fresh(target) and _move_stale_aside(target, is_fresh):
        tmp = _sibling(target, "tmp")
        try:
            tmp.mkdir()
            build(tmp)
            os.rename(tmp, target)  # refused when another builder's output is in place
            installed = True
        except BaseException as e:
            shutil.rmtree(tmp, ignore_errors=True)
            if not isinstance(e, OSError) or not is_fresh(target):  # not a lost race: a real error
                raise
    recover(target, restore=False)  # `target` is fresh here: only dead temporaries go
    return installed


def _move_stale_aside(target: Path, is_fresh: Callable[[Path], bool]) -> bool:
    """Move a stale `target` out of the way and remove it (see `build_shared_dir`).

    Returns True when `target` is to be built (none is in place), False when a fresh one turned up
    (checked again just before the move, or the moved dir was fresh and went back).
    """
    if not target.exists():
        return True
    if is_fresh(target):  # put in place by another builder since the caller's check
        return False
    old = _sibling(target, "old")
    try:
        os.rename(target, old)
    except FileNotFoundError:  # another builder moved it first
        return not is_fresh(target)
    if not is_fresh(old):
        shutil.rmtree(old, ignore_errors=True)
        return True
    try:  # put in place by another builder between the check and the move: theirs goes back
        os.rename(old, target)
    except OSError:
        if not is_fresh(target):  # keep `old` (fresh) rather than leave no fresh copy
            raise
        shutil.rmtree(old, ignore_errors=True)  # a third builder's fresh output took the spot: a duplicate
    return False


def recover(target: Path, marker: str | None = None, restore: bool = True) -> dict[str, int]:
    """Clean up after writers of `target` that were killed: returns what was done.

    - A kill between the two renames of an overwrite leaves no `target`, the previous output as
      `.<name>.old-<pid>-*` and the new one, complete, as `.<name>.tmp-<pid>-*` (`old` exists only
      once the block has finished). With `restore`, the new one goes in place if it holds `marker`,
      else the old one.
    - Every other `.<name>.tmp-<pid>-*` / `.<name>.old-<pid>-*` of a dead process is removed.
    Temporaries of live processes (another run writing the same output) are left alone.
    `restore=False` (`build_shared_dir`, whose `target` is fresh by then) puts nothing in place: an
    old dir could be anyone's stale copy. It also removes the pid-less `.<name>.tmp-<hex>` /
    `.<name>.old-<hex>` that earlier versions named their temporaries: no process of this version
    owns them, so they are what a crashed run of an earlier version left.
    """
    done = {"restored": 0, "promoted": 0, "removed": 0}
    pattern = re.compile(rf"^\.{re.escape(target.name)}\.(tmp|old)-(\d+)-[0-9a-f]+$")
    legacy = re.compile(rf"^\.{re.escape(target.name)}\.(tmp|old)-[0-9a-f]{{8}}$")
    stale: dict[tuple[str, int], list[Path]] = {}
    for p in target.parent.iterdir() if target.parent.is_dir() else []:
        m = pattern.match(p.name)
        if m and not _alive(int(m.group(2))):
            stale.setdefault((m.group(1), int(m.group(2))), []).append(p)
        elif not restore and legacy.match(p.name):
            stale.setdefault(("legacy", -1), []).append(p)
    if restore and not target.exists():
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


def recover_tree(root: str | Path) -> dict[str, int]:
    """`recover` every target under `root` that a killed writer left temporaries of.

    A run killed while writing an atomic file inside its output (a zeroshot chunk, a shard, a
    cache) leaves `.<name>.tmp-<pid>-*` there; its rerun replaces only what it writes again, so
    the dead temporaries of anything else would stay for good. Only dead processes' are touched.
    """
    root = Path(root)
    if not root.is_dir():
        return {"restored": 0, "promoted": 0, "removed": 0}
    pattern = re.compile(r"^\.(.+)\.(tmp|old)-\d+-[0-9a-f]+$")
    targets = {p.parent / m.group(1) for p in root.rglob(".*") if (m := pattern.match(p.name))}
    done = Counter({"restored": 0, "promoted": 0, "removed": 0})
    for target in sorted(targets, key=lambda t: len(t.parts)):  # outer first: a removed dir takes its inner ones
        done.update(recover(target))
    return dict(done)


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


def link_or_copy(src: str | Path, dst: str | Path) -> str:
    """Hard-link `src` to `dst`, or copy it (`shutil.copy2`) where a link is refused: a filesystem
    without hard links (some FUSE/SMB mounts) or another device. Usable as `shutil.copytree`'s
    `copy_function`; returns `dst`."""
    try:
        os.link(src, dst)
    except OSError:
        shutil.copy2(src, dst)
    return str(dst)


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
