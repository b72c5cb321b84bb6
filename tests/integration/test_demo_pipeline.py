"""`cehrx experiment=demo` end to end (what `make demo` runs), shrunk to a micro model and few steps."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

SMALL = (
    "model=micro",
    "trainer.max_steps=20",
    "trainer.val_check_interval=10",
    "trainer.enable_progress_bar=false",
    "trainer.num_sanity_val_steps=0",
    "logger=none",
    "++probe.few_shot=[]",
    "++probe.n_boot=100",
    "++probe.baselines=[counts]",
    "++zeroshot.n_boot=100",
    "++evaluate.n_boot=50",
    "++zeroshot.num_samples=2",
    "++sampling.max_new_tokens=64",  # one sampling block: zero-shot futures and generated patients alike
    "++generate.num_patients=40",
)


@pytest.mark.slow
def test_demo_pipeline_runs_every_stage_and_prints_the_summary(tmp_path: Path) -> None:
    out = tmp_path / "demo"
    cmd = [sys.executable, "-m", "cehrx", "experiment=demo", f"output_dir={out}", *SMALL]
    proc = subprocess.run(cmd, cwd=tmp_path, capture_output=True, text=True, timeout=900)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    for stage_file in (
        "prepared/prepare.json",
        "model/model/config.json",
        "probe/metrics.json",
        "zeroshot/metrics.json",
        "synthetic/generate.json",
        "synthetic/meds",
        "synthetic/omop",
        "synthetic_report/metrics.json",
    ):
        assert (out / stage_file).exists(), stage_file
    assert "cehrx pipeline summary" in proc.stdout and "AUROC" in proc.stdout
    probe = json.loads((out / "probe" / "metrics.json").read_text())
    assert probe  # the probe ran on real GiBleed labels

    again = subprocess.run(
        cmd, cwd=tmp_path, capture_output=True, text=True, timeout=300
    )  # finished stages are skipped
    assert again.returncode == 0 and again.stdout.count("skipping") + again.stderr.count("skipping") >= 6
