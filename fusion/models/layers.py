"""Building blocks shared by the families: Restormer blocks with channel attention, and the
hook that makes their global statistics exact under tiled inference.

Channel ("transposed") attention normalises and correlates queries and keys over *all*
pixels, so it is global. For tiled inference, ``fusion.inference.tiling`` installs a
:class:`GlobalAttention` through ``GLOBAL_ATTENTION`` (a context variable, so concurrent
threads never see each other's): the layers then ask it for the whole image's statistics
instead of computing them from their own tile.
"""

from __future__ import annotations

from contextvars import ContextVar
from typing import Protocol

import torch
import torch.nn.functional as F
from timm.layers import LayerNorm2d
from torch import nn


class GlobalAttention(Protocol):
    """What global layers need from exact tiled inference (``fusion.inference.tiling``)."""

    def channel_scores(self, layer: nn.Module, q: torch.Tensor, k: torch.Tensor
                       ) -> torch.Tensor: ...

    def positions(self, dim: int, grid: tuple[int, int], dtype: torch.dtype) -> torch.Tensor: ...

    def token_block(self, block: nn.Module, tokens: torch.Tensor, grid: tuple[int, int]
                    ) -> torch.Tensor: ...


GLOBAL_ATTENTION: ContextVar[GlobalAttention | None] = ContextVar("fusion_global_attention",
                                                                  default=None)


def icnr_(conv: nn.Conv2d, scale: int) -> None:
    """ICNR init (Aitken et al. 2017): the s^2 sub-pixel outputs of a conv feeding a
    pixel-shuffle start with equal weights, i.e. as a nearest-neighbour upsampling, so the
    shuffle does not begin with (and need not unlearn) a checkerboard."""
    groups = scale ** 2
    if groups == 1:
        return
    with torch.no_grad():
        base = conv.weight[::groups].clone()
        conv.weight.copy_(base.repeat_interleave(groups, dim=0))
        if conv.bias is not None:
            conv.bias.copy_(conv.bias[::groups].repeat_interleave(groups))


class ChannelAttention(nn.Module):
    """Restormer's multi-Dconv head transposed attention; queries may come from another input.

    Attention is over channels (a C/h x C/h map per head), so cost is O(C^2 HW). ``dense``
    makes the 3x3 projection a full convolution instead of a depthwise one (CDDFuse's base
    encoder); ``bias`` adds biases to the projections.
    """

    def __init__(self, dim: int, heads: int, dense: bool = False, bias: bool = False) -> None:
        super().__init__()
        self.heads = heads
        self.temperature = nn.Parameter(torch.ones(heads, 1, 1))

        def spatial(channels: int) -> nn.Conv2d:
            return nn.Conv2d(channels, channels, 3, padding=1, bias=bias,
                             groups=1 if dense else channels)
        self.q = nn.Sequential(nn.Conv2d(dim, dim, 1, bias=bias), spatial(dim))
        self.kv = nn.Sequential(nn.Conv2d(dim, 2 * dim, 1, bias=bias), spatial(2 * dim))
        self.proj = nn.Conv2d(dim, dim, 1, bias=bias)

    def forward(self, x_q: torch.Tensor, x_kv: torch.Tensor) -> torch.Tensor:
        n, c, h, w = x_q.shape
        q = self.q(x_q).reshape(n, self.heads, c // self.heads, h, w)
        k, v = self.kv(x_kv).reshape(n, 2, self.heads, c // self.heads, h, w).unbind(1)
        tiles = GLOBAL_ATTENTION.get()
        if tiles is None:
            qn, kn = F.normalize(q.flatten(3), dim=-1), F.normalize(k.flatten(3), dim=-1)
            scores = qn @ kn.transpose(-2, -1)
        else:
            scores = tiles.channel_scores(self, q, k)
        attn = (scores * self.temperature).softmax(dim=-1)
        return self.proj((attn @ v.flatten(3)).reshape(n, c, h, w))


class GatedFeedForward(nn.Module):
    """Restormer's gated-Dconv feed-forward network (``groups`` < hidden*2: grouped, not
    depthwise, 3x3 conv, as CDDFuse's base encoder)."""

    def __init__(self, dim: int, factor: float, groups: int | None = None,
                 bias: bool = False) -> None:
        super().__init__()
        hidden = int(dim * factor)
        self.inp = nn.Conv2d(dim, 2 * hidden, 1, bias=bias)
        self.dw = nn.Conv2d(2 * hidden, 2 * hidden, 3, padding=1, bias=bias,
                            groups=groups or 2 * hidden)
        self.out = nn.Conv2d(hidden, dim, 1, bias=bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        a, b = self.dw(self.inp(x)).chunk(2, dim=1)
        return self.out(F.gelu(a) * b)


class RestormerBlock(nn.Module):
    """Pre-norm block: x + attention(LN x), then x + FFN(LN x). With ``cross`` the attention
    takes its keys and values from a second input (cross-modality attention)."""

    def __init__(self, dim: int, heads: int, ffn_factor: float, cross: bool = False,
                 dense: bool = False, ffn_groups: int | None = None, bias: bool = False) -> None:
        super().__init__()
        self.norm_q = LayerNorm2d(dim)
        self.norm_kv = LayerNorm2d(dim) if cross else None
        self.attn = ChannelAttention(dim, heads, dense=dense, bias=bias)
        self.norm_ffn = LayerNorm2d(dim) if ffn_factor > 0 else None
        self.ffn = GatedFeedForward(dim, ffn_factor, ffn_groups, bias) if ffn_factor > 0 else None

    def forward(self, x: torch.Tensor, other: torch.Tensor | None = None) -> torch.Tensor:
        q = self.norm_q(x)
        x = x + self.attn(q, q if self.norm_kv is None else self.norm_kv(other))
        return x if self.ffn is None else x + self.ffn(self.norm_ffn(x))


def pad_to(x: torch.Tensor, multiple: int) -> tuple[torch.Tensor, tuple[int, int]]:
    """Pad (N, C, H, W) at the bottom/right to a multiple of ``multiple`` (reflect where the
    image is large enough, else replicate); returns the original (H, W) for cropping."""
    h, w = x.shape[-2:]
    ph, pw = -h % multiple, -w % multiple
    if ph or pw:
        mode = "reflect" if ph < h and pw < w else "replicate"
        x = F.pad(x, (0, pw, 0, ph), mode=mode)
    return x, (h, w)
