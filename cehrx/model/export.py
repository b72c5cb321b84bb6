"""Self-contained model directories: what probe, zero-shot and generate load by path.

`<output_dir>/model/` holds

    model.safetensors    plain state dict of the `GPT` backbone (`model.pt` without safetensors)
    config.json          `GPTConfig.to_dict()`
    vocab.json           the vocabulary the model was trained on
    train_config.yaml    the resolved Hydra config of the training run
    export.json          provenance: source checkpoint, step, metrics

Weights come from a Lightning checkpoint: a single file, or an FSDP sharded checkpoint
directory (consolidated here with Lightning's `_load_distributed_checkpoint`, which reads
`torch.distributed.checkpoint` shards into one full state dict on CPU).
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path
from typing import Any

import torch
from omegaconf import DictConfig, OmegaConf
from torch import Tensor

from cehrx.data.atomic import atomic_dir
from cehrx.data.vocab import Vocab
from cehrx.errors import CehrxError
from cehrx.model.config import MARKER, MODEL_SUBDIR, GPTConfig
from cehrx.model.lightning_module import clean_param_name
from cehrx.model.transformer import GPT

_BACKBONE_PREFIX = "model."  # attribute of the GPT inside CehrxLightningModule


def tied_duplicates(config: GPTConfig) -> set[str]:
    """State-dict keys that alias another parameter (the tied lm head), from a meta-device GPT."""
    with torch.device("meta"):
        gpt = GPT(config)
    unique = {n for n, _ in gpt.named_parameters()}
    return {n for n, _ in gpt.named_parameters(remove_duplicate=False)} - unique


def backbone_state_dict(module_state: dict[str, Tensor]) -> dict[str, Tensor]:
    """The GPT's own keys from a LightningModule state dict (wrapper prefixes removed)."""
    out = {}
    for key, value in module_state.items():
        key = clean_param_name(key)
        if key.startswith(_BACKBONE_PREFIX):
            out[key[len(_BACKBONE_PREFIX) :]] = value
    if not out:
        raise CehrxError("checkpoint holds no backbone weights (no 'model.*' keys): not a cehrx pretrain checkpoint")
    return out


def read_checkpoint(path: str | Path) -> dict[str, Any]:
    """A Lightning checkpoint as one dict, consolidating an FSDP sharded checkpoint directory.

    Returns the checkpoint with the module weights under `state_dict` either way.
    """
    path = Path(path)
    if path.is_dir():
        from lightning.fabric.utilities.load import _METADATA_FILENAME, _load_distributed_checkpoint

        if not (path / _METADATA_FILENAME).is_file():
            raise CehrxError(f"{path} is a directory but not a Lightning sharded checkpoint (no {_METADATA_FILENAME})")
        ckpt = _load_distributed_checkpoint(path)
        ckpt["state_dict"] = ckpt.pop("model")
        return ckpt
    if not path.is_file():
        raise CehrxError(f"no checkpoint at {path}")
    return torch.load(path, map_location="cpu", weights_only=False)


def checkpoint_step(path: str | Path) -> int:
    """The `global_step` recorded in a checkpoint file or sharded checkpoint dir (without loading weights eagerly)."""
    path = Path(path)
    if path.is_dir():
        from lightning.fabric.utilities.load import _METADATA_FILENAME

        meta = torch.load(path / _METADATA_FILENAME, map_location="cpu", weights_only=False)
    else:
        meta = torch.load(path, map_location="cpu", weights_only=False, mmap=True)
    return int(meta.get("global_step", 0))


def export_model(
    state: dict[str, Tensor],
    config: GPTConfig,
    vocab_path: str | Path,
    out_dir: str | Path,
    train_config: DictConfig | dict | None = None,
    info: dict[str, Any] | None = None,
    overwrite: bool = False,
) -> Path:
    """Write a self-contained model directory (atomically: temp dir, then rename)."""
    dups = tied_duplicates(config)
    weights = {k: v.detach().to("cpu").contiguous() for k, v in state.items() if k not in dups}
    _check_weights(config, weights)
    with atomic_dir(out_dir, MARKER, overwrite=overwrite) as tmp:
        try:
            from safetensors.torch import save_file

            save_file(weights, str(tmp / "model.safetensors"), metadata={"format": "cehrx.gpt/1"})
        except ImportError:
            torch.save(weights, tmp / "model.pt")
        shutil.copyfile(vocab_path, tmp / "vocab.json")
        if train_config is not None:
            cfg = train_config if isinstance(train_config, DictConfig) else OmegaConf.create(train_config)
            (tmp / "train_config.yaml").write_text(OmegaConf.to_yaml(cfg, resolve=True))
        (tmp / "export.json").write_text(
            json.dumps({"format": "cehrx.model/1", **(info or {})}, indent=2, default=str) + "\n"
        )
        (tmp / MARKER).write_text(json.dumps(config.to_dict(), indent=2) + "\n")
    return Path(out_dir)


def _check_weights(config: GPTConfig, weights: dict[str, Tensor]) -> None:
    """Fail at export, not at load, when weights and config disagree."""
    with torch.device("meta"):
        gpt = GPT(config)
    expected = {k: tuple(v.shape) for k, v in gpt.state_dict().items()}
    missing = sorted(set(expected) - set(weights) - tied_duplicates(config))
    unexpected = sorted(set(weights) - set(expected))
    wrong = sorted(k for k in set(weights) & set(expected) if tuple(weights[k].shape) != expected[k])
    if missing or unexpected or wrong:
        raise CehrxError(
            f"weights do not match the model config: missing {missing[:5]}, unexpected {unexpected[:5]}, wrong shape {wrong[:5]}"
        )


def export_checkpoint(
    ckpt_path: str | Path,
    out_dir: str | Path,
    vocab_path: str | Path,
    train_config: Any = None,
    overwrite: bool = False,
    info: dict | None = None,
) -> Path:
    """Export the backbone of a Lightning checkpoint (file or FSDP sharded dir) as a model dir."""
    ckpt = read_checkpoint(ckpt_path)
    meta = ckpt.get("cehrx") or {}
    cfg_dict = meta.get("model_config") or ckpt.get("hyper_parameters", {}).get("model_config")
    if cfg_dict is None:
        raise CehrxError(f"{ckpt_path} has no model config: not a cehrx pretrain checkpoint")
    info = {
        "source_checkpoint": str(ckpt_path),
        "global_step": ckpt.get("global_step"),
        "epoch": ckpt.get("epoch"),
        **(info or {}),
    }
    return export_model(
        backbone_state_dict(ckpt["state_dict"]),
        GPTConfig.from_dict(cfg_dict),
        vocab_path,
        out_dir,
        train_config,
        info,
        overwrite,
    )


def model_dir(path: str | Path) -> Path:
    """Resolve a model dir from itself, the training run's output_dir, or a pipeline root above that.

    `cehrx task=pipeline` (and MEDS-DEV's `model_initialization_dir`) put the pretrain run in
    `<root>/model/`, whose export is `<root>/model/model/`.
    """
    path = Path(path)
    for cand in (path, path / MODEL_SUBDIR, path / MODEL_SUBDIR / MODEL_SUBDIR):
        if (cand / MARKER).is_file():
            return cand
    raise CehrxError(
        f"no exported model at {path} (expected {MARKER} there or in {path / MODEL_SUBDIR}; run `cehrx task=pretrain` first)"
    )


def load_pretrained(path: str | Path, map_location: str | torch.device = "cpu") -> tuple[GPT, Vocab]:
    """Load an exported model: `(GPT in eval mode, Vocab)`, from a model dir or a run's output_dir."""
    d = model_dir(path)
    config = GPTConfig.from_dict(json.loads((d / MARKER).read_text()))
    if (d / "model.safetensors").is_file():
        from safetensors.torch import load_file

        state = load_file(str(d / "model.safetensors"), device=str(map_location))
    elif (d / "model.pt").is_file():
        state = torch.load(d / "model.pt", map_location=map_location, weights_only=True)
    else:
        raise CehrxError(f"{d} has no model.safetensors or model.pt")
    vocab = Vocab.load(d / "vocab.json")
    if len(vocab) != config.vocab_size:
        raise CehrxError(f"{d}/vocab.json has {len(vocab)} tokens but config.json says vocab_size={config.vocab_size}")
    gpt = GPT(config)
    missing, unexpected = gpt.load_state_dict(state, strict=False)
    bad_missing = set(missing) - tied_duplicates(config)
    if bad_missing or unexpected:
        raise CehrxError(
            f"{d}: weights do not match config.json (missing {sorted(bad_missing)[:5]}, unexpected {sorted(unexpected)[:5]})"
        )
    return gpt.to(map_location).eval(), vocab


def resolve_device(name: str | None, option: str = "device") -> torch.device:
    """`auto` (CUDA when available, else CPU) or an explicit device; CUDA asked for but absent is an error.

    `option` names the config key in the error, e.g. `probe.device`.
    """
    if name in (None, "auto"):
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if str(name).startswith("cuda") and not torch.cuda.is_available():
        raise CehrxError(f"{option}={name} but CUDA is not available (use {option}=cpu or auto)")
    return torch.device(str(name))


def random_init_like(model: GPT, seed: int) -> GPT:
    """The same architecture with fresh weights: the control a pretrained model must beat."""
    torch.manual_seed(seed)
    return GPT(model.config).to(model.wte.weight.device).eval()
