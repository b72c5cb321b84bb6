"""Locate the inputs a model task needs: the exported model and the prepared dir it was trained on.

Model tasks are run as `cehrx task=probe model_dir=runs/site/model`; the prepared token shards
are found without the user repeating `data.prepared_dir`, from the model's own training config.
"""

from __future__ import annotations

from pathlib import Path

from omegaconf import DictConfig, OmegaConf

from cehrx.errors import CehrxError
from cehrx.model.export import model_dir as resolve_model_dir


def is_prepared_dir(path: str | Path) -> bool:
    """A finished `prepare` output has `vocab.json` and `tokens/`."""
    p = Path(path)
    return (p / "vocab.json").is_file() and (p / "tokens").is_dir()


def prepared_dir_for(cfg: DictConfig, model_dir: str | Path | None = None) -> Path:
    """`data.prepared_dir` when it is a prepared dir, else the one recorded in the model's train config.

    The explicit config wins so a model can be applied to another site's prepared data.
    """
    explicit = Path(str(cfg.data.prepared_dir))
    if is_prepared_dir(explicit):
        return explicit
    if model_dir is not None:
        train_cfg = resolve_model_dir(model_dir) / "train_config.yaml"
        if train_cfg.is_file():
            recorded = OmegaConf.select(OmegaConf.load(train_cfg), "data.prepared_dir")
            if recorded and is_prepared_dir(recorded):
                return Path(str(recorded))
    raise CehrxError(f"no prepared dir at {explicit} (vocab.json and tokens/ expected): run `cehrx task=prepare` or pass data.prepared_dir=...")
