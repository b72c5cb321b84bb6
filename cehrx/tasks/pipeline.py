"""`cehrx task=pipeline`: prepare -> pretrain -> probe -> zeroshot -> generate -> evaluate in one command.

Each stage is composed from the real configs (`task=<stage>` plus the group choices of this
run), so a stage behaves exactly as when run alone; the pipeline only fixes where each stage
reads and writes under one root, and skips stages whose output is already finished, so a
re-run (or a requeued job) continues where it stopped.
"""

from __future__ import annotations

import json
import logging
import time
from pathlib import Path
from typing import Any

from hydra import compose
from hydra.core.hydra_config import HydraConfig
from hydra.core.override_parser.overrides_parser import OverridesParser
from hydra.utils import get_method
from omegaconf import DictConfig, OmegaConf

from cehrx.errors import CehrxError
from cehrx.tasks.scaffold import OUTPUTS, is_finished, recover_output
from cehrx.tasks.summary import print_summary

log = logging.getLogger("cehrx")

# stage -> (sub dir of the root, file that exists once the stage finished)
STAGES = tuple(OUTPUTS)  # in pipeline order; each stage's folder and done marker: cehrx.tasks.scaffold.OUTPUTS
GROUPS = ("data", "model", "trainer", "callbacks", "logger", "local")
OWN_KEYS = ("task", "experiment", "output_dir", "pipeline", "data.prepared_dir", "model_dir", "synthetic_dir")


def stage_dirs(root: Path) -> dict[str, Path]:
    """Where each stage writes under the pipeline root."""
    return {stage: root / OUTPUTS[stage].stage_dir for stage in STAGES}


def is_done(stage: str, out: Path) -> bool:
    """The stage's output is finished (after settling what a killed run left: a stage killed between
    the two renames of its output counts as done, as it is)."""
    recover_output(stage, out)
    return is_finished(stage, out)


def run(cfg: DictConfig) -> dict[str, Any]:
    """Run the configured stages in order; returns each stage's summary JSON."""
    root = Path(cfg.output_dir)
    unknown = [s for s in cfg.pipeline.stages if s not in STAGES]
    if unknown:
        raise CehrxError(f"pipeline.stages: unknown stage(s) {unknown}; choose from {list(STAGES)}")
    dirs = stage_dirs(root)
    base = _base_overrides(cfg, dirs)
    user = _user_overrides()
    summaries: dict[str, Any] = {}
    for stage in cfg.pipeline.stages:
        out = dirs[stage]
        if is_done(stage, out) and not cfg.overwrite:
            log.info("pipeline: %s already finished in %s, skipping", stage, out)
        else:
            overrides = [f"task={stage}", *base, f"output_dir={out}", *cfg.pipeline.overrides.get(stage, [])]
            stage_cfg = compose("config", overrides=overrides + _applicable(overrides, user))
            log.info("pipeline: %s -> %s", stage, out)
            start = time.perf_counter()
            get_method(stage_cfg.task.fn)(stage_cfg)
            log.info("pipeline: %s finished in %.0f s", stage, time.perf_counter() - start)
        summaries[stage] = _read_summary(stage, out)
    print_summary(summaries, dirs)
    return summaries


def _base_overrides(cfg: DictConfig, dirs: dict[str, Path]) -> list[str]:
    """This run's group choices and the shared locations every stage reads."""
    choices = HydraConfig.get().runtime.choices
    picked = [f"{g}={choices[g]}" for g in GROUPS if choices.get(g) not in (None, "null")]
    return picked + [
        f"data.prepared_dir={dirs['prepare']}",
        f"model_dir={dirs['pretrain']}",
        f"synthetic_dir={dirs['generate']}",
        f"seed={cfg.seed}",
        f"overwrite={str(bool(cfg.overwrite)).lower()}",
    ]


def _user_overrides() -> list[str]:
    """Command-line overrides other than the pipeline's own keys and group choices."""
    parsed = OverridesParser.create().parse_overrides(list(HydraConfig.get().overrides.task))
    keep = []
    for o in parsed:
        key = o.key_or_group
        if o.is_sweep_override() or key in GROUPS or any(key == k or key.startswith(k + ".") for k in OWN_KEYS):
            continue
        keep.append(o.input_line)
    return keep


def _applicable(overrides: list[str], user: list[str]) -> list[str]:
    """The user overrides whose key exists in this stage's config, as plain `key=value`.

    Stage options are not in the pipeline's own config, so the command line adds them with
    `++` (`cehrx experiment=demo ++zeroshot.num_samples=5`); each stage gets the ones it has.
    """
    cfg = compose("config", overrides=overrides)
    out = []
    for line in user:
        key, _, value = line.lstrip("+").partition("=")
        if OmegaConf.select(cfg, key, default="__absent__") != "__absent__":
            out.append(f"{key}={value}")
    return out


def _read_summary(stage: str, out: Path) -> Any:
    path = out / OUTPUTS[stage].marker
    if path.suffix != ".json" or not path.is_file():
        return None
    if stage == "pretrain":
        path = out / "metrics.json"
    return json.loads(path.read_text()) if path.is_file() else None
