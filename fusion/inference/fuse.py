"""Fusing real images: any size, colour, 8/16 bit, tiled with seamless blending.

Colour (DESIGN.md section 1): when a source is truly RGB (its channels differ), its luma Y
is fused with the other source and its Cb/Cr are put back; RGB files with grey content are
treated as grey. Images larger than the tile size are fused tile by tile with
``fusion.tiling``, which gives the whole-image result (no seams, no blending needed).
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from PIL import Image

from fusion.errors import BadInputError, FusionError
from fusion.imaging import (
    SourceImage,
    max_value,
    read_image,
    rgb_to_ycbcr,
    to_float,
    ycbcr_to_rgb,
)
from fusion.model import DAEFuse
from fusion.scoring import match_by_stem
from fusion.tiling import fuse_tiled


@dataclass(frozen=True)
class TileSpec:
    size: int = 1024  # tile side in pixels; images no larger than this are fused whole
    halo: int = 64  # context around each tile's core (covers the local layers' reach)


@torch.inference_mode()
def fuse_tensors(model: DAEFuse, a: torch.Tensor, b: torch.Tensor,
                 tiles: TileSpec = TileSpec()) -> torch.Tensor:
    """Fuse (1, 1, H, W) tensors in [0, 1]; tiles (exactly) when the image exceeds the tile
    size."""
    h, w = a.shape[-2:]
    if h <= tiles.size and w <= tiles.size:
        return model.fuse(a, b)
    return fuse_tiled(model, a, b, tiles.size, tiles.halo)


def _is_colour(image: SourceImage) -> bool:
    p = image.pixels
    return image.channels == 3 and not (np.array_equal(p[..., 0], p[..., 1])
                                        and np.array_equal(p[..., 1], p[..., 2]))


def fuse_images(model: DAEFuse, a: SourceImage, b: SourceImage, tiles: TileSpec = TileSpec(),
                device: str | torch.device = "cpu") -> np.ndarray:
    """Fused pixels: grey (H, W) or RGB (H, W, 3), 16-bit when either source is 16-bit."""
    if (a.height, a.width) != (b.height, b.width):
        raise FusionError(f"size mismatch: {a.width}x{a.height} vs {b.width}x{b.height}")
    colour = b if _is_colour(b) else a if _is_colour(a) else None
    planes = []
    for image in (a, b):
        t = to_float(image.pixels)
        planes.append(rgb_to_ycbcr(t)[:1] if image.channels == 3 else t)
    y = fuse_tensors(model, planes[0][None].to(device), planes[1][None].to(device), tiles)[0]
    y = y.float().cpu().clamp(0, 1)
    if colour is not None:
        chroma = rgb_to_ycbcr(to_float(colour.pixels))[1:]
        result = ycbcr_to_rgb(torch.cat([y, chroma])).permute(1, 2, 0)
    else:
        result = y[0]
    bits = 16 if 16 in (a.bits, b.bits) else 8
    scale = max_value(bits)
    return (result.numpy() * scale).round().clip(0, scale).astype(
        np.uint16 if bits == 16 else np.uint8)


def write_png(pixels: np.ndarray, path: str | Path) -> None:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    if pixels.dtype == np.uint16 and pixels.ndim == 3:
        raise FusionError(f"{path}: 16-bit RGB output is not supported by the PNG writer")
    tmp = path.with_name(f".{path.name}.tmp")
    Image.fromarray(pixels).save(tmp, format="PNG")
    tmp.replace(path)


def fuse_files(model: DAEFuse, a: Path, b: Path, out: Path, tiles: TileSpec,
               device: str | torch.device = "cpu") -> None:
    a_img, b_img = read_image(a), read_image(b)
    if (a_img.height, a_img.width) != (b_img.height, b_img.width):
        raise BadInputError(b, f"size mismatch: {a.name} is {a_img.width}x{a_img.height}, "
                               f"{b.name} is {b_img.width}x{b_img.height}")
    write_png(fuse_images(model, a_img, b_img, tiles, device), out)


def fuse_folders(model: DAEFuse, a_dir: Path, b_dir: Path, out_dir: Path, tiles: TileSpec,
                 device: str | torch.device = "cpu") -> tuple[list[Path], list[str]]:
    """Fuse every name present in both folders; returns (written files, error lines)."""
    pairs, errors = match_by_stem(a_dir, b_dir)
    written = []
    for stem, a_path, b_path in pairs:
        target = out_dir / f"{stem}.png"
        try:
            fuse_files(model, a_path, b_path, target, tiles, device)
            written.append(target)
        except FusionError as exc:
            errors.append(str(exc))
    return written, errors
