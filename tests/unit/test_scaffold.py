"""The output contract shared by every task (`cehrx.tasks.scaffold`)."""

from __future__ import annotations

import json
import re
import signal
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
from omegaconf import OmegaConf

from cehrx.errors import CehrxError
from cehrx.tasks import pipeline
from cehrx.tasks.scaffold import OUTPUTS, guard, is_finished, output_target, task_output, write_marker


def test_task_output_appears_finished_with_its_config_or_not_at_all(tmp_path: Path) -> None:
    cfg = OmegaConf.create({"output_dir": str(tmp_path / "p"), "overwrite": False, "x": float("nan")})
    with pytest.raises(CehrxError, match="without writing its marker"):
        with task_output(cfg, "probe") as tmp:
            (tmp / "half.txt").write_text("x")
    assert not (tmp_path / "p").exists() and not list(tmp_path.iterdir())
    with task_output(cfg, "probe") as tmp:
        write_marker(tmp, "probe", {"auroc": float("nan"), "n": 3})
    out = tmp_path / "p"
    assert (
        is_finished("probe", out)
        and (out / "config.yaml").is_file()
        and '"auroc": null' in (out / "metrics.json").read_text()
    )
    with pytest.raises(CehrxError, match="already holds a finished probe output"):
        guard("probe", out, overwrite=False)
    guard("probe", out, overwrite=True)


def test_slurm_logs_in_the_output_dir_survive_the_output_that_replaces_it(tmp_path: Path) -> None:
    """A sharded prepare's map jobs log into `<output_dir>/.submitit/`; the reduce's output replaces the dir."""
    out = tmp_path / "p"
    log = out / ".submitit" / "7_0" / "7_0_0_log.out"
    log.parent.mkdir(parents=True)
    log.write_text("prepared shard 0 of 2\n")
    (out / "multirun").mkdir()
    with log.open("a") as running:  # a job still writing goes on writing to the moved file
        with task_output(OmegaConf.create({"output_dir": str(out), "overwrite": False}), "prepare") as tmp:
            write_marker(tmp, "prepare", {})
        running.write("done\n")
    assert log.read_text() == "prepared shard 0 of 2\ndone\n" and is_finished("prepare", out)
    assert not (out / "multirun").exists()


def test_the_pipeline_takes_its_stages_from_the_task_outputs(tmp_path: Path) -> None:
    assert (
        pipeline.STAGES
        == tuple(OUTPUTS)
        == (
            "prepare",
            "pretrain",
            "probe",
            "finetune",
            "zeroshot",
            "generate",
            "evaluate",
        )
    )
    assert (
        pipeline.stage_dirs(tmp_path)["pretrain"] == tmp_path / "model"
        and OUTPUTS["pretrain"].marker == "model/config.json"
    )


def test_no_library_module_imports_the_cli() -> None:
    """The CLI sits on top: library code reads the configs through `cehrx.configs`."""
    root = Path(__file__).resolve().parents[2] / "cehrx"
    offenders = [
        str(p.relative_to(root))
        for p in root.rglob("*.py")
        if p.name not in ("cli.py", "__main__.py")
        and re.search(r"^\s*(from cehrx.cli |import cehrx.cli)", p.read_text(), re.M)
    ]
    assert offenders == []


# An overwrite killed by SIGKILL between its two renames: `target -> .old-*` done, `.tmp-* -> target` not.
KILLED_BETWEEN_RENAMES = textwrap.dedent("""
    import os, signal, sys
    from cehrx.data import atomic as A
    target, marker = sys.argv[1], sys.argv[2]
    real = os.replace
    def replace(a, b):
        real(a, b)
        os.kill(os.getpid(), signal.SIGKILL)
    A.os.replace = replace
    with A.atomic_dir(target, marker, overwrite=True) as tmp:
        (tmp / marker).parent.mkdir(parents=True, exist_ok=True)
        (tmp / marker).write_text('{"run": "new"}')
""")


def killed_between_renames(task: str, out: Path) -> Path:
    """A finished `task` output in `out`, then an overwrite of it killed between the renames."""
    target, name = output_target(task, out)
    target.mkdir(parents=True)
    (target / name).write_text('{"run": "old"}')
    proc = subprocess.run([sys.executable, "-c", KILLED_BETWEEN_RENAMES, str(target), name])
    assert proc.returncode == -signal.SIGKILL and not target.exists(), "the finished output is hidden"
    return target / name


@pytest.mark.parametrize("task", ["probe", "pretrain"])
def test_a_rerun_finds_the_output_an_overwrite_killed_between_its_renames_left(tmp_path: Path, task: str) -> None:
    """`guard` settles the killed run first: the finished output is back in place before any work starts
    (it was invisible, so a rerun recomputed everything and then refused to replace the output it found)."""
    out = tmp_path / "out"
    marker = killed_between_renames(task, out)
    with pytest.raises(CehrxError, match=f"already holds a finished {task} output"):
        guard(task, out, overwrite=False)
    assert json.loads(marker.read_text()) == {"run": "new"}
    assert [p.name for p in marker.parent.parent.iterdir()] == [marker.parent.name], "no temporary left"


def test_the_pipeline_skips_a_stage_whose_output_a_killed_overwrite_left_hidden(tmp_path: Path) -> None:
    out = tmp_path / "probe"
    killed_between_renames("probe", out)
    assert pipeline.is_done("probe", out) and is_finished("probe", out)


def test_prepare_imports_no_torch_lightning_or_sklearn() -> None:
    """`cehrx task=prepare` (and its shard workers) load the scaffold and write a marker, nothing of the
    model or the metrics: those imports took 5 s, a quarter of a 10 M-event prepare's wall time."""
    code = (
        "import sys, cehrx.cli, cehrx.tasks.prepare, cehrx.tasks.prepare_sharded, cehrx.tasks.prepare_jobs\n"
        "from cehrx.tasks.scaffold import write_marker\n"
        "print(sorted({m.split('.')[0] for m in sys.modules} & {'torch', 'lightning', 'sklearn'}))"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.strip() == "[]", out
