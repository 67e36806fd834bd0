"""DAE-Fuse: shared encoder/decoder, cross-modality attention fusion, two discriminators.

Shapes are (N, 1, H, W) in [0, 1]. ``DAEFuse`` pads inputs to a multiple of the ViT patch
(times the stem stride) and crops back, so any image size works. With ``stem_stride`` s > 1
the encoder starts with a pixel-unshuffle (s x s pixels -> s^2 channels, lossless) and the
decoder ends with the inverse pixel-shuffle: every block then runs on 1/s^2 of the pixels,
which is what makes CPU inference affordable, while no input detail is thrown away.
Channel ("transposed") attention keeps the cost linear in pixels; the ViT runs on a coarse
token grid with 2-D sin-cos positions built for the actual grid size.

Both attentions are global (over all pixels / all tokens). For tiled inference,
``fusion.tiling`` installs a ``GlobalAttention`` through ``GLOBAL_ATTENTION`` (a context
variable, so concurrent threads never see each other's): the layers then ask it for the
whole image's attention statistics instead of computing them from their own tile.
"""

from __future__ import annotations

from contextvars import ContextVar
from typing import Protocol

import torch
import torch.nn.functional as F
from timm.layers import LayerNorm2d, build_sincos2d_pos_embed
from timm.models.resnet import BasicBlock
from timm.models.vision_transformer import Block
from torch import nn

from fusion.params import ModelParams


class GlobalAttention(Protocol):
    """What the attention layers need from exact tiled inference (``fusion.tiling``)."""

    def channel_scores(self, layer: nn.Module, q: torch.Tensor, k: torch.Tensor
                       ) -> torch.Tensor: ...

    def positions(self, dim: int, grid: tuple[int, int], dtype: torch.dtype) -> torch.Tensor: ...

    def token_block(self, block: Block, tokens: torch.Tensor, grid: tuple[int, int]
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

    Attention is over channels (a C/h x C/h map per head), so cost is O(C^2 HW).
    """

    def __init__(self, dim: int, heads: int) -> None:
        super().__init__()
        self.heads = heads
        self.temperature = nn.Parameter(torch.ones(heads, 1, 1))
        self.q = nn.Sequential(nn.Conv2d(dim, dim, 1, bias=False),
                               nn.Conv2d(dim, dim, 3, padding=1, groups=dim, bias=False))
        self.kv = nn.Sequential(nn.Conv2d(dim, 2 * dim, 1, bias=False),
                                nn.Conv2d(2 * dim, 2 * dim, 3, padding=1, groups=2 * dim,
                                          bias=False))
        self.proj = nn.Conv2d(dim, dim, 1, bias=False)

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
    """Restormer's gated-Dconv feed-forward network."""

    def __init__(self, dim: int, factor: float) -> None:
        super().__init__()
        hidden = int(dim * factor)
        self.inp = nn.Conv2d(dim, 2 * hidden, 1, bias=False)
        self.dw = nn.Conv2d(2 * hidden, 2 * hidden, 3, padding=1, groups=2 * hidden, bias=False)
        self.out = nn.Conv2d(hidden, dim, 1, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        a, b = self.dw(self.inp(x)).chunk(2, dim=1)
        return self.out(F.gelu(a) * b)


class RestormerBlock(nn.Module):
    """Pre-norm block: x + attention(LN x), then x + FFN(LN x). With ``other`` given, the
    attention takes its keys and values from ``other`` (cross-modality attention)."""

    def __init__(self, dim: int, heads: int, ffn_factor: float, cross: bool = False) -> None:
        super().__init__()
        self.norm_q = LayerNorm2d(dim)
        self.norm_kv = LayerNorm2d(dim) if cross else None
        self.attn = ChannelAttention(dim, heads)
        self.norm_ffn = LayerNorm2d(dim) if ffn_factor > 0 else None
        self.ffn = GatedFeedForward(dim, ffn_factor) if ffn_factor > 0 else None

    def forward(self, x: torch.Tensor, other: torch.Tensor | None = None) -> torch.Tensor:
        q = self.norm_q(x)
        x = x + self.attn(q, q if self.norm_kv is None else self.norm_kv(other))
        return x if self.ffn is None else x + self.ffn(self.norm_ffn(x))


class LowFrequencyEncoder(nn.Module):
    """ViT on a coarse token grid (stride = patch), upsampled back to full resolution."""

    def __init__(self, dim: int, p: ModelParams) -> None:
        super().__init__()
        self.patch = p.vit_patch
        self.embed = nn.Conv2d(dim, p.vit_dim, p.vit_patch, stride=p.vit_patch)
        self.blocks = nn.ModuleList(Block(p.vit_dim, p.vit_heads, mlp_ratio=2.0, qkv_bias=True)
                                    for _ in range(p.vit_depth))
        self.norm = nn.LayerNorm(p.vit_dim)
        self.out = nn.Conv2d(p.vit_dim, dim, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        tokens = self.embed(x)
        n, d, gh, gw = tokens.shape
        tiles = GLOBAL_ATTENTION.get()
        if tiles is None:
            pos = build_sincos2d_pos_embed([gh, gw], d, device=x.device, dtype=tokens.dtype)
        else:
            pos = tiles.positions(d, (gh, gw), tokens.dtype).to(x.device)
        t = tokens.flatten(2).transpose(1, 2) + pos
        for block in self.blocks:
            t = block(t) if tiles is None else tiles.token_block(block, t, (gh, gw))
        grid = self.norm(t).transpose(1, 2).reshape(n, d, gh, gw)
        return self.out(F.interpolate(grid, size=x.shape[-2:], mode="bilinear",
                                      align_corners=False))


class DAEFuse(nn.Module):
    """Encoder (SE -> DHE || DLE), decoder RD and the cross-modality fusion layer."""

    def __init__(self, p: ModelParams) -> None:
        super().__init__()
        self.params = p
        c, s2 = p.channels, p.stem_stride ** 2
        self.se_embed = nn.Conv2d(s2, c, 3, padding=1)
        self.se = nn.ModuleList(RestormerBlock(c, p.heads, p.ffn_factor)
                                for _ in range(p.se_blocks))
        self.dhe = nn.Sequential(*(BasicBlock(c, c) for _ in range(p.dhe_blocks)))
        self.dle = LowFrequencyEncoder(c, p)
        self.dec_reduce = nn.Conv2d(2 * c, c, 1)
        self.dec = nn.ModuleList(RestormerBlock(c, p.heads, p.ffn_factor)
                                 for _ in range(p.decoder_blocks))
        # shuffle to a few full-resolution channels and finish with a full-resolution conv:
        # a lone pixel-shuffle to one channel leaves a 2x2 checkerboard
        self.dec_out = nn.Conv2d(c, s2 * 8, 3, padding=1)
        icnr_(self.dec_out, p.stem_stride)
        self.dec_full = nn.Conv2d(8, 1, 3, padding=1)
        self.cross_a = RestormerBlock(2 * c, p.heads, p.fusion_ffn_factor, cross=True)
        self.cross_b = RestormerBlock(2 * c, p.heads, p.fusion_ffn_factor, cross=True)
        self.fuse_reduce = nn.Conv2d(4 * c, 2 * c, 1)

    @property
    def multiple(self) -> int:
        """Input sides must be multiples of this (``pad`` takes care of it)."""
        return self.params.vit_patch * self.params.stem_stride

    def pad(self, x: torch.Tensor) -> tuple[torch.Tensor, tuple[int, int]]:
        h, w = x.shape[-2:]
        ph, pw = -h % self.multiple, -w % self.multiple
        if ph or pw:
            mode = "reflect" if ph < h and pw < w else "replicate"
            x = F.pad(x, (0, pw, 0, ph), mode=mode)
        return x, (h, w)

    def encode(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """High- and low-frequency features of padded input (N, 1, H, W)."""
        s = self.se_embed(F.pixel_unshuffle(x, self.params.stem_stride))
        for block in self.se:
            s = block(s)
        return self.dhe(s), self.dle(s)

    def decode(self, phi: torch.Tensor) -> torch.Tensor:
        x = self.dec_reduce(phi)
        for block in self.dec:
            x = block(x)
        x = F.pixel_shuffle(self.dec_out(x), self.params.stem_stride)
        return torch.sigmoid(self.dec_full(F.gelu(x)))

    def reconstruct(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Phase I: (reconstruction, high-freq features, low-freq features)."""
        xp, (h, w) = self.pad(x)
        hf, lf = self.encode(xp)
        return self.decode(torch.cat([hf, lf], 1))[..., :h, :w], hf, lf

    def fuse(self, a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
        """Phase II / inference: fused image from two same-size sources."""
        ap, (h, w) = self.pad(a)
        bp, _ = self.pad(b)
        hf, lf = self.encode(torch.cat([ap, bp], 0))  # one pass, shared weights
        phi_a, phi_b = torch.cat([hf, lf], 1).chunk(2, 0)
        fused = self.fuse_reduce(torch.cat([self.cross_a(phi_a, phi_b),
                                            self.cross_b(phi_b, phi_a)], 1))
        return self.decode(fused)[..., :h, :w]

    def forward(self, a: torch.Tensor, b: torch.Tensor | None = None):
        """``net(x)`` reconstructs (phase I), ``net(a, b)`` fuses: both go through forward so
        that DDP sees every training call."""
        return self.reconstruct(a) if b is None else self.fuse(a, b)


class Discriminator(nn.Module):
    """Strided Conv-LeakyReLU-BatchNorm stack, global pooling, one logit per image."""

    def __init__(self, p: ModelParams) -> None:
        super().__init__()
        layers: list[nn.Module] = []
        c_in, c = 1, p.disc_channels
        for i in range(p.disc_layers):
            layers += [nn.Conv2d(c_in, c, 3, stride=2, padding=1), nn.LeakyReLU(0.2),
                       nn.BatchNorm2d(c)]
            c_in, c = c, min(c * 2, 8 * p.disc_channels) if i < p.disc_layers - 1 else c
        self.features = nn.Sequential(*layers)
        self.fc = nn.Linear(c_in, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc(self.features(x).mean((2, 3))).squeeze(1)
