"""Exported models, the format every later stage reads (inference, the next phase, warm
starts, MLflow, the bundle): ``model.safetensors`` (+ ``critic.safetensors`` for adversarial
families) and ``config.json`` recording the format version, the family and its network
sizes. Loading builds the family's network through the registry: no pickle anywhere.
"""

from __future__ import annotations

import json
from dataclasses import asdict
from pathlib import Path
from typing import TYPE_CHECKING, Any

from fusion.errors import FusionError
from fusion.family import get_family
from fusion.files import Output, replacing, sha256_file

if TYPE_CHECKING:  # torch is imported where weights are touched: reading a config stays fast
    import torch
    from torch import nn

Weights = tuple[dict[str, "torch.Tensor"], dict[str, "torch.Tensor"] | None]  # network, critic
FORMAT = "fusion-model/2"
MODEL_FILE, CRITIC_FILE, CONFIG_FILE = "model.safetensors", "critic.safetensors", "config.json"
EXPORT = Output("fusion train", CONFIG_FILE, frozenset({MODEL_FILE, CRITIC_FILE, CONFIG_FILE}))


def export_model(dest: str | Path, family: str, net: Any, model: nn.Module,
                 critic: nn.Module | None, info: dict[str, Any]) -> Path:
    """Write weights (safetensors) + config.json for inference and the next phase."""
    from safetensors.torch import save_file

    dest = Path(dest)
    with replacing(dest, EXPORT) as tmp:
        save_file({k: v.contiguous() for k, v in model.state_dict().items()},
                  tmp / MODEL_FILE)
        if critic is not None:
            save_file({k: v.contiguous() for k, v in critic.state_dict().items()},
                      tmp / CRITIC_FILE)
        config = {"format": FORMAT, "family": family, "net": asdict(net), **info}
        (tmp / CONFIG_FILE).write_text(json.dumps(config, indent=2, sort_keys=True) + "\n")
    return dest


def read_config(folder: str | Path) -> dict[str, Any]:
    """An export's config.json, checked: known format and a registered family."""
    path = Path(folder) / CONFIG_FILE
    try:
        config = json.loads(path.read_text())
    except (OSError, json.JSONDecodeError) as exc:
        raise FusionError(f"{path}: not an exported model ({exc})") from exc
    if config.get("format") != FORMAT:
        raise FusionError(f"{path}: unknown model format {config.get('format')!r} "
                          f"(this version reads {FORMAT})")
    get_family(config.get("family", ""))
    return config


def net_params(config: dict[str, Any], where: str | Path = CONFIG_FILE) -> Any:
    """The network sizes an export was trained with, typed by its family; errors name the
    config file (``where``)."""
    from fusion.params import typed

    family = get_family(config["family"])
    try:
        return typed(type(family.config().net), config.get("net"), "net")
    except FusionError as exc:
        raise FusionError(f"{where}: {exc}") from exc


def load_weights(folder: str | Path) -> Weights:
    """(network, critic or None) state dicts of an export, e.g. to start the next phase."""
    from safetensors import SafetensorError
    from safetensors.torch import load_file

    folder = Path(folder)
    read_config(folder)
    try:
        critic = folder / CRITIC_FILE
        return (load_file(folder / MODEL_FILE, device="cpu"),
                load_file(critic, device="cpu") if critic.exists() else None)
    except (OSError, SafetensorError) as exc:
        raise FusionError(f"{folder}: cannot load weights ({exc})") from exc


def load_model(folder: str | Path, device: str = "cpu") -> nn.Module:
    """Build the export's family network from config.json and load its weights (no pickle)."""
    from safetensors import SafetensorError
    from safetensors.torch import load_file

    config = read_config(folder)
    family = get_family(config["family"])
    model = family.network_module().build(net_params(config, Path(folder) / CONFIG_FILE))
    weights = Path(folder) / MODEL_FILE
    try:
        state = load_file(weights, device="cpu")
    except (OSError, SafetensorError) as exc:
        raise FusionError(f"{weights}: cannot load weights ({exc})") from exc
    mismatch = weights_mismatch(model.state_dict(), state)
    if mismatch:
        raise FusionError(f"{weights}: weights do not fit the network of "
                          f"{CONFIG_FILE} ({mismatch})")
    model.load_state_dict(state)
    return model.to(device).eval()


def weights_mismatch(expected: dict[str, Any], found: dict[str, Any]) -> str:
    """Why a state dict does not fit a network, in one line ("" when it does)."""
    missing = sorted(set(expected) - set(found))
    extra = sorted(set(found) - set(expected))
    shapes = [(k, tuple(found[k].shape), tuple(v.shape)) for k, v in expected.items()
              if k in found and tuple(found[k].shape) != tuple(v.shape)]
    parts = []
    if shapes:
        key, theirs, ours = shapes[0]
        parts.append(f"{len(shapes)} tensor(s) of another shape, first {key}: {theirs} in the "
                     f"file, {ours} in the network")
    if missing:
        parts.append(f"{len(missing)} missing, first {missing[0]}")
    if extra:
        parts.append(f"{len(extra)} unexpected, first {extra[0]}")
    return "; ".join(parts)


def weights_digest(folder: str | Path) -> str:
    """SHA-256 of an export's network weights: ties reports, registry entries and run names
    to the exact weights."""
    path = Path(folder) / MODEL_FILE
    if not path.exists():
        raise FusionError(f"{folder}: no exported model ({MODEL_FILE} missing)")
    return sha256_file(path)
