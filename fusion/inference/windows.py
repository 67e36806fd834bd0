"""Large images in linear time: overlapping windows, each fused on its own, cross-faded.

Exact tiling (``fusion.inference.tiling``) runs every tile once per global attention layer,
and a ViT's keys grow with the image, so its cost grows faster than the pixels: a 49 MP
pair of the default model has about 191,000 tokens, about 9 TMAC of attention. Above
``TileSpec.exact_pixels`` an image is fused the way restoration models fuse large images
(the tile mode of Restormer's and SwinIR's test scripts): every window sees only itself
in its attention layers, and neighbours are cross-faded over their overlap, so no seam
shows. Cost is one forward pass per window; memory is one window plus the image planes.
The networks were trained on 128-pixel patches, so a 512-pixel window is still more
context than they ever saw; what it changes is measured in ``benchmarks/bench_windows.py``.
"""

from __future__ import annotations

import sys
from collections.abc import Callable

import numpy as np

from fusion.progress import progress

Run = Callable[[np.ndarray, np.ndarray], np.ndarray]  # (a, b) -> fused (..., H, W), one window
FLOOR = 1e-6  # smallest blend weight: every pixel keeps a defined (normalised) value


def _starts(length: int, size: int, step: int) -> list[int]:
    """Window starts along one axis: every ``step``, the last one flush with the end."""
    if length <= size:
        return [0]
    return [*range(0, length - size, step), length - size]


def _ramp(start: int, stop: int, length: int, overlap: int) -> np.ndarray:
    """A window's blend weight along one axis: near zero within ``overlap / 4`` of an edge
    inside the image (where padding effects live), rising linearly over the next
    ``overlap / 2``; 1 elsewhere and along the image's own border."""
    inward = np.arange(stop - start, dtype=np.float64) + 0.5
    weight = np.ones(stop - start)
    rise = max(overlap / 2, 1)
    for near, edge in ((start > 0, inward), (stop < length, inward[::-1])):
        if near:
            weight = np.minimum(weight, np.clip((edge - overlap / 4) / rise, FLOOR, 1))
    return weight


def _axis(length: int, size: int, step: int, overlap: int
          ) -> tuple[dict[int, np.ndarray], np.ndarray]:
    """One axis of the window grid: each window's start and blend ramp, and their sum."""
    ramps = {s: _ramp(s, min(s + size, length), length, overlap)
             for s in _starts(length, size, step)}
    norm = np.zeros(length)
    for s, ramp in ramps.items():
        norm[s:s + ramp.size] += ramp
    return ramps, norm


def _reflected(start: int, stop: int, length: int) -> np.ndarray:
    """Indices start..stop-1 of an axis, mirrored at its ends (``np.pad`` mode reflect)."""
    index = np.abs(np.arange(start, stop))
    return np.where(index >= length, 2 * (length - 1) - index, index)


def fuse_windows(run: Run, a: np.ndarray, b: np.ndarray, size: int, overlap: int,
                 margin: int) -> np.ndarray:
    """Fuse grey planes (H, W) in windows the network sees as ``size`` pixels square: the
    window and ``margin`` more pixels around it (mirrored beyond the image border, as whole
    images get). Neighbours overlap by at least ``overlap`` and are cross-faded there.
    Windows form a grid, so the sum of their weights is the outer product of two axis sums,
    never held as an image."""
    h, w = a.shape
    margin = min(margin, h - 1, w - 1)
    size -= 2 * margin
    step = max(size - overlap, 1)
    (ramps_y, norm_y), (ramps_x, norm_x) = (_axis(n, size, step, overlap) for n in (h, w))
    print(f"note: {w}x{h} is fused in {len(ramps_y) * len(ramps_x)} overlapping windows of "
          f"{size + 2 * margin} pixels (attention sees one window; see `fusion fuse "
          "--help`, --exact-pixels)", file=sys.stderr)
    out = None  # (..., h, w): the run's leading axes (a contribution map beside the image)
    windows = [(y, x) for y in ramps_y for x in ramps_x]
    for y, x in progress(windows, "windows", unit="window"):
        y1, x1 = min(y + size, h), min(x + size, w)
        rows = _reflected(y - margin, y1 + margin, h)  # one shape for every window:
        cols = _reflected(x - margin, x1 + margin, w)  # onnxruntime plans it once
        fused = run(a[np.ix_(rows, cols)], b[np.ix_(rows, cols)])
        if out is None:
            out = np.zeros(fused.shape[:-2] + (h, w), np.float32)
        core = fused[..., margin:margin + y1 - y, margin:margin + x1 - x]
        out[..., y:y1, x:x1] += core * np.outer(ramps_y[y], ramps_x[x]).astype(np.float32)
    out /= norm_y.astype(np.float32)[:, None]
    out /= norm_x.astype(np.float32)[None, :]
    return out
