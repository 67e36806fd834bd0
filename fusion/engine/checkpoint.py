"""Training checkpoints that verify themselves, written atomically.

A checkpoint (for resuming) is a folder with ``state.pt`` (network, discriminators,
optimizers, schedulers, step, phase, RNG state; only tensors and plain values, loaded with
``torch.load(weights_only=True)``) and ``manifest.json``, written last, holding the state's
size and SHA-256. A folder whose manifest is missing or does not match is not a checkpoint:
resuming skips it with a warning and takes the newest good one.
"""

from __future__ import annotations

import hashlib
import io
import json
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

from fusion.errors import FusionError
from fusion.files import Output, replacing, sha256_file

STATE_FILE = "state.pt"
MANIFEST = "manifest.json"
CHECKPOINT = Output("a training run", MANIFEST, frozenset({STATE_FILE, MANIFEST}))


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


def checkpoints(folder: Path) -> list[Path]:
    """Checkpoint folders of a local run, oldest first (temp folders are never listed)."""
    return sorted(p for p in folder.glob("step-*") if p.is_dir())


def newest_good(candidates: list[Any], read: Callable[[Any], dict[str, Any]],
                run: str) -> dict[str, Any] | None:
    """The newest checkpoint state that verifies, warning about each bad one skipped.

    ``read`` raises FusionError for a bad checkpoint. No good one among existing ones is an
    error (exit 2): resuming cannot continue and starting over must be asked for.
    """
    bad = []
    for candidate in reversed(candidates):
        try:
            return read(candidate)
        except FusionError as exc:
            print(f"warning: skipping checkpoint {candidate}: {exc}", file=sys.stderr)
            bad.append(str(candidate))
    if bad:
        raise FusionError(f"{run}: none of its {len(bad)} checkpoint(s) is readable "
                          "(see the warnings); rerun with --fresh to start this run over")
    return None
