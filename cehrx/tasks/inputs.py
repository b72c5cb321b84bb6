"""Locate the inputs a model task needs: the exported model and the prepared dir it was trained on.

Model tasks are run as `cehrx task=probe model_dir=runs/site/model`; the prepared token shards
are found without the user repeating `data.prepared_dir`, from the model's own training config.
"""

from __future__ import annotations

from pathlib import Path

from omegaconf import DictConfig, OmegaConf

from cehrx.data.vocab import Vocab
from cehrx.errors import CehrxError
from cehrx.model.export import model_dir as resolve_model_dir


def is_prepared_dir(path: str | Path) -> bool:
    """A finished `prepare` output has `vocab.json` and `tokens/`."""
    p = Path(path)
    return (p / "vocab.json").is_file() and (p / "tokens").is_dir()


def recorded_prepared_dir(model_dir: str | Path) -> Path | None:
    """The `data.prepared_dir` the model was trained on, from its exported training config."""
    train_cfg = resolve_model_dir(model_dir) / "train_config.yaml"
    if not train_cfg.is_file():
        return None
    recorded = OmegaConf.select(OmegaConf.load(train_cfg), "data.prepared_dir")
    return Path(str(recorded)) if recorded else None


def prepared_dir_for(cfg: DictConfig, model_dir: str | Path | None = None) -> Path:
    """The prepared dir a task reads: `data.prepared_dir`, or the one the model was trained on.

    Without a model, `data.prepared_dir` must be a prepared dir. With one, the prepared dir must
    hold the model's vocabulary (token ids mean nothing under another): `data.prepared_dir`
    when it does, since the user may point a model at other data prepared with its vocabulary,
    else the recorded one. A default `data.prepared_dir` (`runs/<data.name>`) holding some other
    data set is thus never fed to the model silently.
    """
    explicit = Path(str(cfg.data.prepared_dir))
    if model_dir is None:
        if is_prepared_dir(explicit):
            return explicit
        raise CehrxError(
            f"no prepared dir at {explicit} (vocab.json and tokens/ expected): run `cehrx task=prepare` or pass data.prepared_dir=..."
        )
    model_tokens = Vocab.load(resolve_model_dir(model_dir) / "vocab.json").tokens
    candidates = [explicit, recorded_prepared_dir(model_dir)]
    found = [c for c in candidates if c is not None and is_prepared_dir(c)]
    for cand in found:
        if Vocab.load(cand / "vocab.json").tokens == model_tokens:
            return cand
    if found:
        raise CehrxError(
            f"{found[0]}/vocab.json is not the vocabulary of the model in {model_dir}: pass data.prepared_dir=<the prepared dir the model was trained on>"
        )
    raise CehrxError(
        f"no prepared dir for the model in {model_dir}: neither data.prepared_dir={explicit} nor the one it was trained on "
        f"({candidates[1]}) holds vocab.json and tokens/; pass data.prepared_dir=..."
    )
