"""Reading source images into arrays, and colour handling shared by prepare, fuse and score.

Images keep their bit depth (8 or 16 bit) as ``uint8``/``uint16`` arrays; RGB sources are
reduced to luma Y (YCbCr, via kornia) where a single channel is needed.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import kornia.color
import numpy as np
import torch
from PIL import Image, UnidentifiedImageError

from fusion.errors import BadInputError, FusionError

SUPPORTED_SUFFIXES = frozenset({".png", ".jpg", ".jpeg", ".bmp", ".tif", ".tiff"})


@dataclass(frozen=True)
class SourceImage:
    """Decoded pixels: ``(H, W)`` grey or ``(H, W, 3)`` RGB, ``uint8`` or ``uint16``."""

    pixels: np.ndarray

    @property
    def bits(self) -> int:
        return 16 if self.pixels.dtype == np.uint16 else 8

    @property
    def channels(self) -> int:
        return 1 if self.pixels.ndim == 2 else self.pixels.shape[2]

    @property
    def height(self) -> int:
        return self.pixels.shape[0]

    @property
    def width(self) -> int:
        return self.pixels.shape[1]


def _pixels(im: Image.Image) -> np.ndarray:
    mode = im.mode
    if mode in ("L", "RGB"):
        return np.asarray(im)
    if mode.startswith("I;16"):
        return np.asarray(im).astype(np.uint16)
    if mode == "I":  # 16-bit greys decoded as int32 by some Pillow codecs
        arr = np.asarray(im)
        if arr.min() < 0 or arr.max() > 65535:
            raise FusionError("32-bit integer pixels are not supported (only 8 and 16 bit)")
        return arr.astype(np.uint16)
    if mode in ("1", "LA"):
        return np.asarray(im.convert("L"))
    if mode in ("P", "PA", "RGBA", "CMYK", "YCbCr", "LAB", "HSV"):
        return np.asarray(im.convert("RGB"))
    raise FusionError(f"unsupported pixel format {mode!r}")


def read_image(path: str | Path) -> SourceImage:
    """Decode ``path`` fully, or raise :class:`FusionError` naming the file and the reason."""
    path = Path(path)
    if path.suffix.lower() not in SUPPORTED_SUFFIXES:
        raise BadInputError(path, f"unsupported format {path.suffix or '(no suffix)'!r}")
    try:
        if path.stat().st_size == 0:
            raise BadInputError(path, "empty file")
        with Image.open(path) as im:
            im.load()
            pixels = _pixels(im)
    except BadInputError:
        raise
    except FusionError as exc:
        raise BadInputError(path, str(exc)) from exc
    except FileNotFoundError as exc:
        raise BadInputError(path, "file not found") from exc
    except (OSError, ValueError, SyntaxError, UnidentifiedImageError,
            Image.DecompressionBombError) as exc:
        raise BadInputError(path, f"cannot decode image ({exc})") from exc
    if pixels.size == 0:
        raise BadInputError(path, "image has no pixels")
    return SourceImage(np.ascontiguousarray(pixels))


def max_value(bits: int) -> float:
    return 65535.0 if bits == 16 else 255.0


def to_float(pixels: np.ndarray) -> torch.Tensor:
    """``uint8``/``uint16`` array -> float32 tensor in [0, 1], channels first (C, H, W)."""
    scale = max_value(16 if pixels.dtype == np.uint16 else 8)
    t = torch.from_numpy(pixels.astype(np.float32) / scale)
    return t.unsqueeze(0) if t.ndim == 2 else t.permute(2, 0, 1)


def rgb_to_ycbcr(rgb: torch.Tensor) -> torch.Tensor:
    """(..., 3, H, W) RGB in [0, 1] -> YCbCr (kornia's BT.601 full-range conversion)."""
    return kornia.color.rgb_to_ycbcr(rgb)


def ycbcr_to_rgb(ycbcr: torch.Tensor) -> torch.Tensor:
    return kornia.color.ycbcr_to_rgb(ycbcr).clamp(0.0, 1.0)


def luma(image: SourceImage) -> np.ndarray:
    """Single-channel pixels at the image's own bit depth: grey as is, RGB -> Y."""
    if image.channels == 1:
        return image.pixels
    y = rgb_to_ycbcr(to_float(image.pixels))[0]
    scale = max_value(image.bits)
    out = torch.round(y * scale).clamp(0, scale).numpy()
    return out.astype(np.uint16 if image.bits == 16 else np.uint8)
