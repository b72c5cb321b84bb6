"""`cehrx.data.workdir.claim_work_dir`: resume a run of the same settings, refuse another unless overwrite."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from cehrx.data.workdir import claim_work_dir
from cehrx.errors import CehrxError


def test_fresh_resume_refuse_and_overwrite(tmp_path: Path) -> None:
    work = tmp_path / "work"
    settings = {"seed": 1, "sampling": {"top_p": 0.9}, "path": tmp_path}  # a Path is recorded as its str
    assert claim_work_dir(work, settings, False, what="test") is False
    assert json.loads((work / "settings.json").read_text())["path"] == str(tmp_path)
    (work / "piece.bin").write_bytes(b"done")
    assert claim_work_dir(work, settings, False, what="test") is True, "same settings: resume"
    assert (work / "piece.bin").is_file()
    with pytest.raises(CehrxError, match=r"different test run \(other settings: sampling, seed\).*overwrite=true"):
        claim_work_dir(work, {"seed": 2, "sampling": {"top_p": 1.0}, "path": tmp_path}, False, what="test")
    assert (work / "piece.bin").is_file(), "a refused claim leaves the run alone"
    assert claim_work_dir(work, {"seed": 2}, True, what="test") is False, "overwrite starts over"
    assert not (work / "piece.bin").exists() and json.loads((work / "settings.json").read_text()) == {"seed": 2}


def test_layout_of_the_settings_file_does_not_matter(tmp_path: Path) -> None:
    """Files written compactly or in another key order (older runs) still resume."""
    work = tmp_path / "w"
    work.mkdir()
    (work / "manifest.json").write_text('{"b": [1, 2], "a": 1.0}')
    (work / "0.parquet").write_bytes(b"")
    assert claim_work_dir(work, {"a": 1, "b": (1, 2)}, False, what="test", settings_file="manifest.json")
    assert (work / "manifest.json").read_text() == '{\n  "a": 1,\n  "b": [\n    1,\n    2\n  ]\n}\n'


def test_files_without_settings_are_not_claimed(tmp_path: Path) -> None:
    work = tmp_path / "w"
    work.mkdir()
    (work / "other.txt").write_text("someone else's")
    with pytest.raises(CehrxError, match="no settings.json: not a test work dir"):
        claim_work_dir(work, {"a": 1}, False, what="test")
    (work / "settings.json").write_text("{not json")
    with pytest.raises(CehrxError, match="not a test work dir"):
        claim_work_dir(work, {"a": 1}, False, what="test")
    assert claim_work_dir(work, {"a": 1}, True, what="test") is False and not (work / "other.txt").exists()
    empty = tmp_path / "empty"
    empty.mkdir()
    assert claim_work_dir(empty, {"a": 1}, False, what="test") is False, "an empty dir is a fresh run"


def test_the_same_run_resumes_under_overwrite(tmp_path: Path) -> None:
    """An interrupted overwrite=true run, rerun as it was, keeps its progress: overwrite replaces a finished
    output, it does not throw away the work of the same settings."""
    work = tmp_path / "work"
    assert claim_work_dir(work, {"seed": 1}, True, what="test") is False
    (work / "piece.bin").write_bytes(b"done")
    assert claim_work_dir(work, {"seed": 1}, True, what="test") is True, "same settings + overwrite: resume"
    assert (work / "piece.bin").read_bytes() == b"done"
    assert claim_work_dir(work, {"seed": 2}, True, what="test") is False and not (work / "piece.bin").exists()
