"""Shared fixtures: synthetic image writers and the real benchmark data beside the repo."""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

REPO = Path(__file__).resolve().parents[1]
SHARED_DATA = Path(os.environ.get("FUSION_SHARED_DATA", REPO.parent / "shared" / "data"))


def textured(h: int, w: int, seed: int = 0, rgb: bool = False, bits: int = 8) -> np.ndarray:
    """A deterministic image with structure everywhere (so no patch is dropped as flat)."""
    rng = np.random.default_rng(seed)
    top = 65535 if bits == 16 else 255
    arr = rng.integers(0, top + 1, size=(h, w, 3) if rgb else (h, w))
    return arr.astype(np.uint16 if bits == 16 else np.uint8)


def save(path: Path, arr: np.ndarray) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(arr).save(path)  # uint16 grey -> mode "I;16"
    return path


@pytest.fixture
def shared_data() -> Path:
    if not SHARED_DATA.is_dir():
        pytest.skip(f"benchmark data not found at {SHARED_DATA}")
    return SHARED_DATA
