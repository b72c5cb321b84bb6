"""`cehrx.data.atomic` under a real SIGKILL: nothing half-written looks finished, nothing is lost."""

from __future__ import annotations

import signal
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

from cehrx.data.atomic import atomic_dir, atomic_file, build_shared_dir, recover, recover_tree
from cehrx.errors import CehrxError

CHILD = textwrap.dedent("""
    import os, signal, sys
    from cehrx.data import atomic as A
    target, where = sys.argv[1], sys.argv[2]
    real = os.replace
    def replace(a, b):
        real(a, b)
        if where == "between":  # after `target -> old`, before `tmp -> target`
            os.kill(os.getpid(), signal.SIGKILL)
    A.os.replace = replace
    with A.atomic_dir(target, "done", overwrite=True) as tmp:
        (tmp / "done").write_text("new")
        if where == "inside":
            os.kill(os.getpid(), signal.SIGKILL)
""")


def killed_overwrite(tmp_path: Path, where: str) -> Path:
    target = tmp_path / "out"
    with atomic_dir(target, "done") as t:
        (t / "done").write_text("old")
    proc = subprocess.run([sys.executable, "-c", CHILD, str(target), where])
    assert proc.returncode == -signal.SIGKILL
    return target


def test_kill_inside_the_block_keeps_the_finished_output_and_the_next_run_cleans_up(tmp_path: Path) -> None:
    target = killed_overwrite(tmp_path, "inside")
    assert (target / "done").read_text() == "old"
    assert [p.name for p in tmp_path.iterdir() if p.name.startswith(".out.tmp-")], "a SIGKILL runs no cleanup"
    with pytest.raises(CehrxError, match="overwrite=true"):
        with atomic_dir(target, "done"):
            pass
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out"], "the next writer removed the dead one's temporary"


def test_kill_between_the_renames_never_leaves_no_output(tmp_path: Path) -> None:
    target = killed_overwrite(tmp_path, "between")
    assert not target.exists() and len(list(tmp_path.iterdir())) == 2  # old and (finished) new, both hidden
    assert recover(target.resolve(), "done") == {"restored": 0, "promoted": 1, "removed": 1}
    assert (target / "done").read_text() == "new" and sorted(p.name for p in tmp_path.iterdir()) == ["out"]
    target2 = killed_overwrite(tmp_path / "b", "between")
    assert recover(target2.resolve()) == {
        "restored": 1,
        "promoted": 0,
        "removed": 1,
    }  # unknown marker: the old one back
    assert (target2 / "done").read_text() == "old"


def test_live_writers_temporaries_are_left_alone(tmp_path: Path) -> None:
    import os

    mine = tmp_path / f".out.tmp-{os.getpid()}-abcd1234"
    mine.mkdir()
    dead = tmp_path / ".out.tmp-999999999-abcd1234"  # no such process
    dead.mkdir()
    with atomic_file(tmp_path / "out") as f:
        f.write_text("x")
    assert mine.exists() and not dead.exists() and (tmp_path / "out").read_text() == "x"


def test_dead_temporaries_inside_an_output_go_and_nothing_else(tmp_path: Path) -> None:
    """A run killed while writing a chunk inside its output leaves `.N.parquet.tmp-<pid>-*` there."""
    import os

    from cehrx.tasks.scaffold import recover_output

    out = tmp_path / "zs"
    chunks = out / "work" / "chunks"
    chunks.mkdir(parents=True)
    (chunks / "0.parquet").write_text("kept")
    dead_file = chunks / ".1.parquet.tmp-999999999-abcd1234"
    dead_file.write_text("half")
    dead_dir = out / ".store.tmp-999999999-abcd1234"
    (dead_dir / "inner").mkdir(parents=True)
    (dead_dir / "inner" / ".x.tmp-999999999-abcd1234").write_text("")
    live = chunks / f".2.parquet.tmp-{os.getpid()}-abcd1234"
    live.write_text("being written")
    assert recover_output("zeroshot", out)["removed"] == 2
    assert not dead_file.exists() and not dead_dir.exists()
    assert live.exists() and (chunks / "0.parquet").read_text() == "kept"
    assert recover_tree(out)["removed"] == 0 and recover_tree(tmp_path / "none")["removed"] == 0


def fresh(d: Path) -> bool:
    """A shared dir is fresh when its `done` file says "v2"."""
    return (d / "done").is_file() and (d / "done").read_text() == "v2"


def write_v2(tmp: Path) -> None:
    (tmp / "data").write_text("mine")
    (tmp / "done").write_text("v2")


def test_shared_dir_is_built_once_and_a_stale_one_is_replaced(tmp_path: Path) -> None:
    target = tmp_path / "cache"
    assert build_shared_dir(target, fresh, write_v2) and (target / "data").read_text() == "mine"
    assert not build_shared_dir(target, fresh, lambda tmp: pytest.fail("a fresh dir is not rebuilt"))
    (target / "done").write_text("v1")  # stale
    assert build_shared_dir(target, fresh, write_v2) and fresh(target)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["cache"], "no temporary left"


def test_the_loser_of_a_race_keeps_the_winners_dir(tmp_path: Path) -> None:
    """Another builder puts its dir in place while ours builds: ours is discarded, theirs untouched."""
    target = tmp_path / "cache"

    def race(tmp: Path) -> None:
        write_v2(tmp)
        winner = tmp_path / "winner"
        winner.mkdir()
        (winner / "data").write_text("theirs")
        (winner / "done").write_text("v2")
        winner.rename(target)

    assert not build_shared_dir(target, fresh, race)
    assert (target / "data").read_text() == "theirs"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["cache"]


def theirs(target: Path) -> Path:
    target.mkdir()
    (target / "data").write_text("theirs")
    (target / "done").write_text("v2")
    return target


def test_a_dir_fresh_by_the_time_of_the_move_is_not_moved(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Our first check saw a stale dir; another builder's fresh one was in place before our move:
    the check just before the move sees it, and `target` is never renamed (readers never miss it)."""
    from cehrx.data import atomic

    target = theirs(tmp_path / "cache")
    checks = iter([False])  # the first check (of `target`) saw it stale; every later check is real
    renames: list[tuple[Path, Path]] = []
    real = atomic.os.rename
    monkeypatch.setattr(atomic.os, "rename", lambda a, b: (renames.append((Path(a), Path(b))), real(a, b))[1])

    def racing(d: Path) -> bool:
        return next(checks, fresh(d))

    assert not build_shared_dir(target, racing, lambda tmp: pytest.fail("a fresh dir is not rebuilt"))
    assert renames == [], "the fresh dir was moved"
    assert (target / "data").read_text() == "theirs"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["cache"]


def test_a_fresh_dir_moved_aside_in_the_last_instant_is_put_back_and_not_rebuilt(tmp_path: Path) -> None:
    """Both checks saw a stale dir; the fresh one of another builder was in place by the rename itself:
    it goes back, and nothing is built (the put-back dir is the cache)."""
    target = theirs(tmp_path / "cache")
    checks = iter([False, False])  # the caller's check and the one just before the move

    def racing(d: Path) -> bool:
        return next(checks, fresh(d))

    assert not build_shared_dir(target, racing, lambda tmp: pytest.fail("rebuilt after the put-back"))
    assert (target / "data").read_text() == "theirs"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["cache"]


def test_a_dead_builders_old_dir_is_never_restored(tmp_path: Path) -> None:
    """A killed builder's moved-aside (stale) dir is removed, never put in place: not over a built
    `target`, and not where `target` is missing either (`recover(restore=False)`)."""
    target = tmp_path / "cache"
    dead_old = tmp_path / ".cache.old-999999999-abcd1234"
    dead_old.mkdir()
    (dead_old / "data").write_text("stale")
    assert build_shared_dir(target, fresh, write_v2)
    assert (target / "data").read_text() == "mine" and not dead_old.exists()
    other = tmp_path / "other"
    dead_old = tmp_path / ".other.old-999999999-abcd1234"
    dead_old.mkdir()
    assert recover(other, restore=False) == {"restored": 0, "promoted": 0, "removed": 1}
    assert not other.exists() and not dead_old.exists()


def test_temporaries_of_earlier_versions_go_once_fresh(tmp_path: Path) -> None:
    """Earlier versions named temporaries without a process id (`.<name>.tmp-<hex>`): removed once
    `target` is fresh; `atomic_dir`'s recover (which restores) leaves them alone."""
    target = tmp_path / "cache"
    legacy = [tmp_path / ".cache.tmp-0123abcd", tmp_path / ".cache.old-89abcdef"]
    for p in legacy:
        p.mkdir()
    recover(target)
    assert all(p.exists() for p in legacy)
    assert build_shared_dir(target, fresh, write_v2)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["cache"]


def test_a_failed_build_raises_and_dead_builders_leftovers_go_once_fresh(tmp_path: Path) -> None:
    import os

    target = tmp_path / "cache"

    def broken(tmp: Path) -> None:
        raise OSError("disk full")

    with pytest.raises(OSError, match="disk full"):
        build_shared_dir(target, fresh, broken)
    assert list(tmp_path.iterdir()) == [], "its own temporary removed"
    dead = tmp_path / ".cache.tmp-999999999-abcd1234"  # a killed builder's
    live = tmp_path / f".cache.tmp-{os.getpid()}-abcd1234"  # a builder still at work
    dead.mkdir()
    live.mkdir()
    assert build_shared_dir(target, fresh, write_v2)
    assert not dead.exists() and live.exists()


def test_link_or_copy_copies_where_links_are_refused(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """A filesystem without hard links (some FUSE/SMB mounts) or another device: a copy instead."""
    import os
    import shutil

    from cehrx.data import atomic

    src = tmp_path / "src"
    (src / "sub").mkdir(parents=True)
    (src / "sub" / "a.parquet").write_bytes(b"chunk")
    shutil.copytree(src, tmp_path / "linked", copy_function=atomic.link_or_copy)
    assert os.stat(tmp_path / "linked" / "sub" / "a.parquet").st_ino == os.stat(src / "sub" / "a.parquet").st_ino

    def refused(a, b):
        raise OSError(18, "Invalid cross-device link")

    monkeypatch.setattr(atomic.os, "link", refused)
    shutil.copytree(src, tmp_path / "copied", copy_function=atomic.link_or_copy)
    copied = tmp_path / "copied" / "sub" / "a.parquet"
    assert copied.read_bytes() == b"chunk" and os.stat(copied).st_ino != os.stat(src / "sub" / "a.parquet").st_ino
