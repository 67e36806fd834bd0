"""Fusing real images with any family: any size, grey or colour, 8 or 16 bit, tiled exactly.

Colour (DESIGN.md section 1): when a source is truly RGB (its channels differ), its luma Y
is fused with the other source and its Cb/Cr are put back; RGB files with grey content are
treated as grey. The output has the larger bit depth of the two sources, and colour when
a source has it; both are decided from the headers, before the model runs, so an output
format that cannot hold the result is refused at once. Images larger than the tile are
fused tile by tile with ``fusion.inference.tiling``, which reproduces the whole-image result
for families that declare exact tiling; the others are fused whole, and say so. Above
``TileSpec.exact_pixels`` images are fused in overlapping windows instead
(``fusion.inference.windows``), in time linear in the pixels.
"""

from __future__ import annotations

import sys
from collections.abc import Callable
from dataclasses import dataclass
from functools import partial
from pathlib import Path
from typing import NamedTuple, Protocol

import numpy as np

from fusion.data.images import (
    DEFAULT_MAX_PIXELS,
    ImageInfo,
    SourceImage,
    max_value,
    output_format,
    probe_image,
    read_image,
    rgb_to_ycbcr,
    size_mismatch,
    to_unit,
    write_image,
    ycbcr_to_rgb,
)
from fusion.data.pairs import match_stems
from fusion.device import PRECISIONS
from fusion.errors import BadInputError, FusionError
from fusion.progress import progress


@dataclass(frozen=True)
class TileSpec:
    size: int = 1024  # tile side in pixels; images no larger than this are fused whole
    halo: int = 64  # context around each tile's core (covers the local layers' reach)
    exact_pixels: int = 1 << 20  # larger images: overlapping windows, linear time
    # (fusion.inference.windows); up to this, exact tiling, whose cost grows with the
    # square of a ViT's tokens
    window: int = 512  # side of the windows above exact_pixels, margin included: the
    # cheapest per pixel in torch on 2 cores (1.1 s per MP; 1.5-1.7 at 384, 640 or 768)
    overlap: int = 32  # windows overlap by this much beyond their mirrored margin; 64
    # costs 13 % more windows and scored the same (benchmarks/bench_windows.py)

    def __post_init__(self) -> None:
        if self.halo < 0 or self.size < 2 * self.halo + 32:
            raise FusionError(f"--tile {self.size} must exceed twice --halo {self.halo} by at "
                              "least 32 pixels (the tile's core)")
        if self.overlap < 0 or self.window < 2 * (MARGIN + self.overlap) + 32:
            raise FusionError(f"--window {self.window} must exceed twice its margin "
                              f"({MARGIN}) and --window-overlap {self.overlap} by at least "
                              "32 pixels")


MARGIN = 16  # reflected pixels around every image: zero-padded convolutions never see the
# image border, which would otherwise leave a dark line along it


def add_margin(a: np.ndarray, b: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    m = min(MARGIN, a.shape[0] - 1, a.shape[1] - 1)
    return tuple(np.pad(x, m, mode="reflect") if m > 0 else np.asarray(x) for x in (a, b))


def crop_margin(fused: np.ndarray, shape: tuple[int, ...]) -> np.ndarray:
    m = (fused.shape[-2] - shape[0]) // 2
    return fused[..., m:m + shape[0], m:m + shape[1]]


def fuse_planes(run: Callable[[np.ndarray, np.ndarray], np.ndarray], a: np.ndarray,
                b: np.ndarray, tiles: TileSpec) -> np.ndarray:
    """An engine's network (``run``: planes with margin in, the fused plane out, or a stack
    of planes (..., H, W) such as the fused image and a contribution map) over a whole
    image: with a mirrored margin, or in overlapping windows above ``tiles.exact_pixels``."""
    if a.size > tiles.exact_pixels:
        from fusion.inference.windows import fuse_windows

        return fuse_windows(run, a, b, tiles.window, tiles.overlap, MARGIN)
    return crop_margin(run(*add_margin(a, b)), a.shape)


class Engine(Protocol):
    """Fuses two grey float32 planes in [0, 1] of one size into one (torch or ONNX)."""

    explains: bool

    def __call__(self, a: np.ndarray, b: np.ndarray) -> np.ndarray: ...

    def explain(self, a: np.ndarray, b: np.ndarray) -> tuple[np.ndarray, np.ndarray]: ...


class TorchEngine:
    """A family's network in torch; tiles exactly when the image exceeds the tile."""

    def __init__(self, model, family, tiles: TileSpec = TileSpec(), device="cpu",
                 precision: str = "auto") -> None:
        import copy

        import torch

        from fusion.device import native_bf16
        from fusion.models.layers import fold_norms

        if precision not in PRECISIONS:
            raise FusionError(f"--precision must be one of {', '.join(PRECISIONS)}, "
                              f"not {precision!r}")
        # a private copy in inference form (the caller may go on training its model);
        # channels-last: the 1x1 and depthwise convolutions run about 20% faster on CPU
        self.model = fold_norms(copy.deepcopy(model)).to(device=device,
                                                          memory_format=torch.channels_last)
        self.family, self.tiles, self.device = family, tiles, device
        self.explains = family.explains
        self.precision = precision
        self._bf16_native = native_bf16(torch.device(device))

    def _bf16(self, a: np.ndarray) -> bool:
        """bf16 for windowed images where it is native (``auto``): about 2x faster on an
        AVX512-BF16 CPU (``benchmarks/bench_large.py``) at unchanged scores
        (``benchmarks/bench_windows.py``). Windows are an approximation already; the exact
        path stays fp32, equal to the whole-image result."""
        if self.precision == "auto":
            return self._bf16_native and a.size > self.tiles.exact_pixels
        return self.precision == "bf16"

    def _autocast(self, bf16: bool):
        import torch

        return torch.autocast(torch.device(self.device).type, torch.bfloat16, enabled=bf16)

    def _tensors(self, a: np.ndarray, b: np.ndarray):
        import torch

        return (torch.from_numpy(np.ascontiguousarray(x, np.float32))[None, None]
                .to(self.device).contiguous(memory_format=torch.channels_last) for x in (a, b))

    def __call__(self, a: np.ndarray, b: np.ndarray) -> np.ndarray:
        return fuse_planes(partial(self._run, bf16=self._bf16(a)), a, b, self.tiles)

    def _run(self, a: np.ndarray, b: np.ndarray, bf16: bool = False) -> np.ndarray:
        """The network on planes that already carry their margin."""
        import torch

        from fusion.inference.tiling import fuse_tiled

        ta, tb = self._tensors(a, b)
        h, w = ta.shape[-2:]
        with torch.inference_mode(), self._autocast(bf16):
            if h <= self.tiles.size and w <= self.tiles.size:
                fused = self.model.fuse(ta, tb)
            elif self.family.exact_tiling:
                fused = fuse_tiled(self.model, ta, tb, self.tiles.size, self.tiles.halo)
            else:
                print(f"note: {self.family.name} cannot be tiled exactly; fusing the "
                      f"{w}x{h} image whole (memory grows with the image)", file=sys.stderr)
                fused = self.model.fuse(ta, tb)
        return fused[0, 0].float().clamp(0, 1).cpu().numpy()

    def explain(self, a: np.ndarray, b: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """The fused plane and the contribution map, in windows above the exact limit as
        fusion is, so the map of a 49 MP pair costs what its fusion does."""
        fused, contribution = fuse_planes(partial(self._explain_run, bf16=self._bf16(a)),
                                          a, b, self.tiles)
        return fused, contribution

    def _explain_run(self, a: np.ndarray, b: np.ndarray, bf16: bool = False) -> np.ndarray:
        import torch

        ta, tb = self._tensors(a, b)
        with torch.inference_mode(), self._autocast(bf16):
            out = self.model.explain(ta, tb)
        return np.stack([out[k][0, 0].float().clamp(0, 1).cpu().numpy()
                         for k in ("fused", "contribution")])


@dataclass(frozen=True)
class Plan:
    """What fusing a pair will produce, decided from the two headers."""

    width: int
    height: int
    bits: int
    colour: bool  # at least one source declares colour (a grey-content RGB file turns out grey)


def plan(a: ImageInfo, b: ImageInfo) -> Plan:
    """Check a pair before any decoding: same size; the output's depth and colour."""
    if (a.width, a.height) != (b.width, b.height):
        raise size_mismatch(a.path, (a.width, a.height), b.path, (b.width, b.height))
    return Plan(a.width, a.height, max(a.bits, b.bits), 3 in (a.channels, b.channels))


class UnitPlane:
    """A decoded source as the grey [0, 1] float32 plane the engines fuse, converted where
    it is read: windows of a large image convert only themselves, so a 49 MP pair does not
    hold two float32 planes (392 MB) beside its pixels. ``np.asarray`` gives it whole."""

    ndim, dtype = 2, np.dtype(np.float32)

    def __init__(self, image: SourceImage) -> None:
        self.image = image
        self.shape = (image.height, image.width)
        self.size = image.height * image.width

    def __getitem__(self, key) -> np.ndarray:
        unit = to_unit(self.image.pixels[key])
        return rgb_to_ycbcr(unit)[..., 0] if self.image.channels == 3 else unit

    def __array__(self, dtype=None, copy=None) -> np.ndarray:
        plane = self[:, :]
        return plane if dtype is None else plane.astype(dtype, copy=False)


ROWS = 256  # rows converted at a time: the output of a 49 MP image stays small


def _pixels(y: np.ndarray, colour: SourceImage | None, bits: int) -> np.ndarray:
    """The fused luma as output pixels, the colour source's chroma put back."""
    scale = max_value(bits)
    pixels = np.empty(y.shape + ((3,) if colour is not None else ()),
                      np.uint16 if bits == 16 else np.uint8)
    for top in range(0, y.shape[0], ROWS):
        rows = slice(top, top + ROWS)
        result = y[rows]
        if colour is not None:
            ycbcr = rgb_to_ycbcr(to_unit(colour.pixels[rows]))
            ycbcr[..., 0] = result
            result = ycbcr_to_rgb(ycbcr)
        pixels[rows] = np.clip(np.round(result * scale), 0, scale)
    return pixels


class Fused(NamedTuple):
    """A fused pair: ``pixels`` grey (H, W) or RGB (H, W, 3) at the larger bit depth of the
    sources; ``luma`` the fused grey plane before it was rounded, in [0, 1] (what the
    published protocol stretches); ``contribution`` of source A, or None."""

    pixels: np.ndarray
    luma: np.ndarray
    contribution: np.ndarray | None


def fuse_images(engine: Engine, a: SourceImage, b: SourceImage, explain: bool = False
                ) -> Fused:
    """Fuse two decoded images (the luma of a colour source, its colour put back)."""
    if (a.height, a.width) != (b.height, b.width):
        raise FusionError(f"size mismatch: {a.width}x{a.height} vs {b.width}x{b.height}")
    colour = b if b.is_colour else a if a.is_colour else None
    planes = UnitPlane(a), UnitPlane(b)
    weight = None
    if explain:
        y, weight = engine.explain(*planes)
    else:
        y = engine(*planes)
    pixels = _pixels(y, colour, max(a.bits, b.bits))
    return Fused(pixels, y, weight)


def fuse_files(engine: Engine, a: Path, b: Path, out: Path,
               max_pixels: int = DEFAULT_MAX_PIXELS, explain: Path | None = None) -> Fused:
    """Fuse one pair of files into ``out`` (its suffix picks the format); with ``explain``,
    also write the contribution map of source A there (8-bit grey)."""
    spec = plan(probe_image(a, max_pixels), probe_image(b, max_pixels))
    output_format(out, spec.bits, spec.colour)
    if explain is not None and not engine.explains:
        raise FusionError("--explain: this model family has no contribution map")
    fused = fuse_images(engine, read_image(a, max_pixels), read_image(b, max_pixels),
                        explain is not None)
    write_image(fused.pixels, out)
    if fused.contribution is not None:
        write_image(np.round(fused.contribution * 255).astype(np.uint8), explain)
    return fused


def fuse_folders(engine: Engine, a_dir: Path, b_dir: Path, out_dir: Path,
                 max_pixels: int = DEFAULT_MAX_PIXELS, explain: bool = False
                 ) -> tuple[list[Path], list[str]]:
    """Fuse every stem present once in both folders into ``<stem>.png`` (16-bit when a
    source is); returns (written files, one error line per pair or file that failed)."""
    pairs, errors = match_stems(a_dir, b_dir)
    written = []
    for stem, a_path, b_path in progress(pairs, "fuse", unit="pair"):
        target = out_dir / f"{stem}.png"
        try:
            fuse_files(engine, a_path, b_path, target, max_pixels,
                       out_dir / "contribution" / f"{stem}.png" if explain else None)
            written.append(target)
        except BadInputError as exc:
            errors.append(str(exc))
    return written, errors
