"""`cehrx.data.atomic` under a real SIGKILL: nothing half-written looks finished, nothing is lost."""

from __future__ import annotations

import signal
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

from cehrx.data.atomic import atomic_dir, atomic_file, recover
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
