"""Training checkpoints that verify themselves, and exported models, written atomically.

- Training checkpoints (resume): a folder with ``state.pt`` (network, discriminators,
  optimizers, schedulers, step, phase, RNG state; only tensors and plain values, loaded with
  ``torch.load(weights_only=True)``) and ``manifest.json``, written last, holding the
  state's size and SHA-256. A folder whose manifest is missing or does not match is not a
  checkpoint: resuming skips it with a warning and takes the newest good one.
- Exported models (inference, the next phase, warm starts, MLflow): ``model.safetensors``
  (+ ``critic.safetensors`` for adversarial families) and ``config.json`` recording the
  format version, the family and its network sizes. Loading goes through the registry.
"""

from __future__ import annotations

import hashlib
import io
import json
from dataclasses import asdict
from pathlib import Path
from typing import TYPE_CHECKING, Any

from fusion.errors import FusionError
from fusion.files import Output, replacing, sha256_file
from fusion.models.registry import get_family

if TYPE_CHECKING:  # torch is imported where weights are touched: reading a config stays fast
    import torch
    from torch import nn

Weights = tuple[dict[str, "torch.Tensor"], dict[str, "torch.Tensor"] | None]  # network, critic
FORMAT = "fusion-model/2"
STATE_FILE = "state.pt"
MANIFEST = "manifest.json"
MODEL_FILE, CRITIC_FILE, CONFIG_FILE = "model.safetensors", "critic.safetensors", "config.json"
CHECKPOINT = Output("a training run", MANIFEST, frozenset({STATE_FILE, MANIFEST}))
EXPORT = Output("fusion train", CONFIG_FILE, frozenset({MODEL_FILE, CRITIC_FILE, CONFIG_FILE}))


def save_state(state: dict[str, Any], dest: str | Path) -> Path:
    """Write a training checkpoint folder atomically, its manifest last."""
    import torch

    dest = Path(dest)
    with replacing(dest, CHECKPOINT) as tmp:
        torch.save(state, tmp / STATE_FILE)
        manifest = {"step": state["step"], "phase": state["phase"],
                    "bytes": (tmp / STATE_FILE).stat().st_size,
                    "sha256": sha256_file(tmp / STATE_FILE)}
        (tmp / MANIFEST).write_text(json.dumps(manifest, indent=2) + "\n")
    return dest


def check_state(manifest: bytes | None, state: bytes | None) -> str:
    """Why a checkpoint's bytes are not a good checkpoint ("" when they are)."""
    if manifest is None:
        return f"no {MANIFEST} (an incomplete write)"
    if state is None:
        return f"no {STATE_FILE}"
    try:
        expected = json.loads(manifest)
    except json.JSONDecodeError:
        return f"{MANIFEST} is not readable"
    if len(state) != expected.get("bytes"):
        return f"{STATE_FILE} has {len(state)} bytes, the manifest says {expected.get('bytes')}"
    if hashlib.sha256(state).hexdigest() != expected.get("sha256"):
        return f"{STATE_FILE} does not match its SHA-256"
    return ""


def read_state(data: bytes, where: str) -> dict[str, Any]:
    import torch

    try:
        return torch.load(io.BytesIO(data), map_location="cpu", weights_only=True)
    except (OSError, RuntimeError, EOFError, ValueError) as exc:
        raise FusionError(f"{where}: not a readable training checkpoint ({exc})") from exc


def _maybe(path: Path) -> bytes | None:
    return path.read_bytes() if path.is_file() else None


def load_state(folder: str | Path) -> dict[str, Any]:
    """A verified local checkpoint, or a FusionError naming it and why it is bad."""
    folder = Path(folder)
    reason = check_state(_maybe(folder / MANIFEST), _maybe(folder / STATE_FILE))
    if reason:
        raise FusionError(f"{folder}: not a good training checkpoint ({reason})")
    return read_state((folder / STATE_FILE).read_bytes(), str(folder))


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


def net_params(config: dict[str, Any]) -> Any:
    """The network sizes an export was trained with, typed by its family."""
    from fusion.params import typed

    family = get_family(config["family"])
    return typed(type(family.config().net), config["net"], f"{config['family']}.net")


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
    model = family.impl().build(net_params(config))
    weights = Path(folder) / MODEL_FILE
    try:
        model.load_state_dict(load_file(weights, device="cpu"))
    except (OSError, RuntimeError, SafetensorError) as exc:
        raise FusionError(f"{weights}: cannot load weights ({exc})") from exc
    return model.to(device).eval()


def weights_digest(folder: str | Path) -> str:
    """SHA-256 of an export's network weights: ties reports, registry entries and run names
    to the exact weights."""
    path = Path(folder) / MODEL_FILE
    if not path.exists():
        raise FusionError(f"{folder}: no exported model ({MODEL_FILE} missing)")
    return sha256_file(path)
