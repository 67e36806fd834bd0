"""Exact tiled inference: tiles give the same fused image as one whole-image pass.

Attention layers can be global: channel attention normalises and correlates over all
pixels, a ViT attends over all tokens. Tiles fused
independently therefore see other statistics and differ from the whole image by a few grey
levels. Here the image is run in passes instead. Pass k runs every tile up to the k-th
global layer, which adds the tile *core*'s share to that layer's whole-image statistics
(channel attention: the q k^T sums and channel norms; ViT: the core tokens' keys and
values) and stops. Once all tiles are in, the layer uses the finished statistics in every
later pass. The last pass runs the tiles to the end and writes their cores. A family
without global layers (convolutions and windowed attention only) needs one pass.

Cores partition the (padded) image on the network's grid, so every pixel and token is
counted once. Each tile adds a ``halo`` around its core that covers the receptive field of
the local layers (convolutions, ViT token interpolation), so a core's output equals the
whole-image output up to float rounding. Memory is bounded by the tile size; compute is
about one tile forward pass per attention layer plus one, on tiles that grow by the halo.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn

from fusion.models.layers import (
    GLOBAL_ATTENTION,
    ChannelAttention,
    TokenBlock,
    cosine,
    pad_to,
    sincos_positions,
)
from fusion.progress import progress


class _Collected(Exception):
    """A tile reached the layer whose statistics this pass gathers; the rest waits."""


def _cores(length: int, core: int) -> list[tuple[int, int]]:
    """Split [0, length) into near-equal segments of at most ``core`` (both on the grid)."""
    count = -(-length // core)
    return [(length * i // count, length * (i + 1) // count) for i in range(count)]


@dataclass
class _Tile:
    """A tile (y0:y1, x0:x1) of the padded image and its core, in pixels."""

    y0: int
    y1: int
    x0: int
    x1: int
    core_y: tuple[int, int]
    core_x: tuple[int, int]

    def core_in(self, scale: int) -> tuple[slice, slice]:
        """The core, relative to the tile, on a grid ``scale`` pixels per cell."""
        return (slice((self.core_y[0] - self.y0) // scale, (self.core_y[1] - self.y0) // scale),
                slice((self.core_x[0] - self.x0) // scale, (self.core_x[1] - self.x0) // scale))


@dataclass
class _Statistics:
    """Whole-image attention statistics, layer by layer, and the tile being run. A layer's
    scale (pixels per feature cell or token) is read off its input's size."""

    height: int  # padded image, pixels
    width: int
    tile: _Tile | None = None
    done: dict[int, Any] = field(default_factory=dict)
    partial: dict[int, Any] = field(default_factory=dict)
    finals: dict[int, Callable[[Any], Any]] = field(default_factory=dict)
    gathering: int | None = None

    def _scale(self, cells: int) -> int:
        return (self.tile.y1 - self.tile.y0) // cells

    # -- channel attention ------------------------------------------------------------
    def channel_scores(self, layer: nn.Module, q: torch.Tensor, k: torch.Tensor
                       ) -> torch.Tensor:
        key = id(layer)
        if key in self.done:
            return self.done[key]
        ys, xs = self.tile.core_in(self._scale(q.shape[-2]))
        qc, kc = q[..., ys, xs].flatten(3).double(), k[..., ys, xs].flatten(3).double()
        sums = [qc @ kc.transpose(-2, -1), qc.square().sum(-1), kc.square().sum(-1)]
        self._gather(key, sums, lambda old, new: [o + n for o, n in zip(old, new, strict=True)],
                     self._channel_final)
        raise _Collected

    @staticmethod
    def _channel_final(sums: list[torch.Tensor]) -> torch.Tensor:
        gram, q2, k2 = sums
        return cosine(gram, q2.sqrt(), k2.sqrt()).float()

    # -- ViT ----------------------------------------------------------------------------
    def positions(self, dim: int, grid: tuple[int, int], dtype: torch.dtype) -> torch.Tensor:
        patch = self._scale(grid[0])
        gh, gw = self.height // patch, self.width // patch
        pos = sincos_positions((gh, gw), dim, dtype).reshape(gh, gw, dim)
        ty, tx = self.tile.y0 // patch, self.tile.x0 // patch
        return pos[ty:ty + grid[0], tx:tx + grid[1]].reshape(grid[0] * grid[1], dim)

    def token_block(self, block: TokenBlock, tokens: torch.Tensor, grid: tuple[int, int]
                    ) -> torch.Tensor:
        key = id(block)
        if key not in self.done:
            ys, xs = self.tile.core_in(self._scale(grid[0]))
            k, v = (x.unflatten(2, grid)[:, :, ys, xs].flatten(2, 3)
                    for x in block.keys_values(tokens))  # (N, heads, core tokens, head_dim)
            self._gather(key, (k, v), lambda old, new: tuple(torch.cat([o, n], 2)
                                                             for o, n in zip(old, new,
                                                                             strict=True)),
                         lambda kv: kv)
            raise _Collected
        return block.attend(tokens, *self.done[key])

    # -- bookkeeping ------------------------------------------------------------------
    def _gather(self, key: int, value: Any, combine: Callable[[Any, Any], Any],
                final: Callable[[Any], Any]) -> None:
        if self.gathering not in (None, key):
            raise RuntimeError("tiles reached different attention layers in one pass")
        self.gathering = key
        self.partial[key] = combine(self.partial[key], value) if key in self.partial else value
        self.finals[key] = final

    def finish(self) -> None:
        """The layer gathered in this pass has all tiles' statistics: finalise them."""
        key, self.gathering = self.gathering, None
        self.done[key] = self.finals.pop(key)(self.partial.pop(key))


def _tiles(height: int, width: int, size: int, halo: int, grid: int) -> list[_Tile]:
    core = max((size - 2 * halo) // grid * grid, grid)
    tiles = []
    for cy in _cores(height // grid, core // grid):
        for cx in _cores(width // grid, core // grid):
            y0, y1 = cy[0] * grid, cy[1] * grid
            x0, x1 = cx[0] * grid, cx[1] * grid
            tiles.append(_Tile(max(y0 - halo, 0), min(y1 + halo, height),
                               max(x0 - halo, 0), min(x1 + halo, width), (y0, y1), (x0, x1)))
    return tiles


@torch.inference_mode()
def fuse_tiled(model: nn.Module, a: torch.Tensor, b: torch.Tensor, size: int, halo: int
               ) -> torch.Tensor:
    """Fuse (1, 1, H, W) tensors tile by tile, equal to ``model.fuse(a, b)`` up to rounding.

    ``size`` bounds the tile side (core plus halo on both sides); ``halo`` is rounded up to
    the network's grid (``model.multiple``: stem stride times ViT patch or Swin window).
    """
    grid = model.multiple
    h, w = a.shape[-2:]
    ap, _ = pad_to(a, grid)
    bp, _ = pad_to(b, grid)
    height, width = ap.shape[-2:]
    halo = -(-halo // grid) * grid
    stats = _Statistics(height, width)
    tiles = _tiles(height, width, size, halo, grid)
    out = torch.zeros(1, 1, height, width, device=a.device)
    passes = 1 + sum(isinstance(m, ChannelAttention | TokenBlock)
                     for m in model.modules())  # at most: one per global layer, plus the last
    bar = progress(range(passes * len(tiles)), "tiles", unit="tile")
    token = GLOBAL_ATTENTION.set(stats)
    try:
        while True:
            finished = 0
            for tile in tiles:
                next(bar, None)
                stats.tile = tile
                try:
                    fused = model.fuse(ap[..., tile.y0:tile.y1, tile.x0:tile.x1],
                                       bp[..., tile.y0:tile.y1, tile.x0:tile.x1])
                except _Collected:
                    continue
                ys, xs = tile.core_in(1)
                out[..., tile.core_y[0]:tile.core_y[1], tile.core_x[0]:tile.core_x[1]] = \
                    fused[..., ys, xs]
                finished += 1
            if stats.gathering is None:
                bar.close()
                return out[..., :h, :w]
            if finished:
                raise RuntimeError("tiles reached different attention layers in one pass")
            stats.finish()
    finally:
        GLOBAL_ATTENTION.reset(token)

