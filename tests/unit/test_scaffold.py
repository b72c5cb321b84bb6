"""The output contract shared by every task (`cehrx.tasks.scaffold`)."""

from __future__ import annotations

import re
from pathlib import Path

import pytest
from omegaconf import OmegaConf

from cehrx.errors import CehrxError
from cehrx.tasks import pipeline
from cehrx.tasks.scaffold import OUTPUTS, guard, is_finished, task_output, write_marker


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


def test_the_pipeline_takes_its_stages_from_the_task_outputs(tmp_path: Path) -> None:
    assert pipeline.STAGES == tuple(OUTPUTS) == ("prepare", "pretrain", "probe", "zeroshot", "generate", "evaluate")
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
