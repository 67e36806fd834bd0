"""Checkpoints and exported models, written atomically (temp + rename).

- Training checkpoints (resume): one folder with ``state.pt`` holding models, optimizers,
  schedulers, step, phase and RNG state; only tensors and plain Python values, loaded with
  ``torch.load(weights_only=True)`` so loading cannot run pickled code.
- Exported models (inference, phase hand-over): ``model.safetensors`` + ``config.json``
  (and ``discriminators.safetensors``); no pickle at all.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file

from fusion.atomic import fresh_tmp, replace_dir
from fusion.errors import FusionError
from fusion.model import DAEFuse
from fusion.params import ModelParams

FORMAT = "dae-fuse/1"
STATE_FILE = "state.pt"


def save_state(state: dict[str, Any], dest: str | Path) -> Path:
    """Write a training checkpoint folder atomically."""
    dest = Path(dest)
    tmp = fresh_tmp(dest)
    try:
        torch.save(state, tmp / STATE_FILE)
        replace_dir(tmp, dest)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return dest


def load_state(folder: str | Path) -> dict[str, Any]:
    path = Path(folder) / STATE_FILE
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except (OSError, RuntimeError, EOFError) as exc:
        raise FusionError(f"{path}: not a readable training checkpoint ({exc})") from exc


def export_model(dest: str | Path, model: DAEFuse, discriminators: torch.nn.Module,
                 info: dict[str, Any]) -> Path:
    """Write weights (safetensors) + config.json for inference and the next phase."""
    dest = Path(dest)
    tmp = fresh_tmp(dest)
    try:
        save_file({k: v.contiguous() for k, v in model.state_dict().items()},
                  tmp / "model.safetensors")
        save_file({k: v.contiguous() for k, v in discriminators.state_dict().items()},
                  tmp / "discriminators.safetensors")
        config = {"format": FORMAT, "model": model.params.__dict__, **info}
        (tmp / "config.json").write_text(json.dumps(config, indent=2, sort_keys=True) + "\n")
        replace_dir(tmp, dest)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return dest


def read_config(folder: str | Path) -> dict[str, Any]:
    path = Path(folder) / "config.json"
    try:
        config = json.loads(path.read_text())
    except (OSError, json.JSONDecodeError) as exc:
        raise FusionError(f"{path}: not an exported model ({exc})") from exc
    if config.get("format") != FORMAT:
        raise FusionError(f"{path}: unknown model format {config.get('format')!r}")
    return config


def load_model(folder: str | Path, device: str | torch.device = "cpu") -> DAEFuse:
    """Build the network from config.json and load its safetensors weights (no pickle)."""
    config = read_config(folder)
    model = DAEFuse(ModelParams(**config["model"]))
    weights = Path(folder) / "model.safetensors"
    try:
        model.load_state_dict(load_file(weights, device="cpu"))
    except (OSError, RuntimeError, SafetensorError) as exc:
        raise FusionError(f"{weights}: cannot load weights ({exc})") from exc
    return model.to(device).eval()


Weights = tuple[dict[str, torch.Tensor], dict[str, torch.Tensor]]


def load_weights(folder: str | Path) -> Weights:
    """(autoencoder, discriminators) state dicts of an export, e.g. to start phase II."""
    folder = Path(folder)
    read_config(folder)
    try:
        return (load_file(folder / "model.safetensors", device="cpu"),
                load_file(folder / "discriminators.safetensors", device="cpu"))
    except (OSError, SafetensorError) as exc:
        raise FusionError(f"{folder}: cannot load weights ({exc})") from exc
