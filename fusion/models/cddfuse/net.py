"""CDDFuse: shared Restormer encoder, Lite-Transformer base and INN detail branches, their
fusion layers, and a Restormer decoder whose output is added to a source and squashed.

Shapes are (N, 1, H, W) in [0, 1]. As in DAE-Fuse, ``stem_stride`` s > 1 starts with a
lossless pixel-unshuffle and ends with a pixel-shuffle plus one full-resolution conv (the
CPU profile); ``stem_stride`` 1 is the paper's full-resolution network. The attention is
channel attention (global), so ``fusion.inference.tiling`` makes tiles exact as for
DAE-Fuse; everything else is local.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from fusion.models.cddfuse import Net
from fusion.models.layers import (
    RestormerBlock,
    icnr_,
    learned_two_scale,
    pad_to,
    two_scale,
    zero_conv,
)

HEAD_CHANNELS = 8  # full-resolution channels after the pixel-shuffle


class InvertedResidual(nn.Module):
    """MobileNetV2 block without a skip: 1x1 expand, ReLU6, reflect-padded depthwise 3x3,
    ReLU6, 1x1 project (no biases, no normalisation)."""

    def __init__(self, channels: int, expand: int) -> None:
        super().__init__()
        hidden = channels * expand
        self.body = nn.Sequential(
            nn.Conv2d(channels, hidden, 1, bias=False), nn.ReLU6(),
            nn.ReflectionPad2d(1), nn.Conv2d(hidden, hidden, 3, groups=hidden, bias=False),
            nn.ReLU6(), nn.Conv2d(hidden, channels, 1, bias=False))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.body(x)


class Coupling(nn.Module):
    """One INN node: mix the halves (1x1 conv), then the affine coupling
    z2 += phi(z1); z1 = z1 * exp(rho(z2)) + eta(z2)."""

    def __init__(self, dim: int, expand: int) -> None:
        super().__init__()
        half = dim // 2
        self.mix = nn.Conv2d(dim, dim, 1)
        self.phi, self.rho, self.eta = (InvertedResidual(half, expand) for _ in range(3))

    def forward(self, z1: torch.Tensor, z2: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        z1, z2 = self.mix(torch.cat([z1, z2], 1)).chunk(2, 1)
        z2 = z2 + self.phi(z1)
        return z1 * torch.exp(self.rho(z2)) + self.eta(z2), z2


class DetailBranch(nn.Module):
    """INN blocks: the high-frequency (detail) encoder, or the detail fusion layer."""

    def __init__(self, dim: int, layers: int, expand: int) -> None:
        super().__init__()
        self.nodes = nn.ModuleList(Coupling(dim, expand) for _ in range(layers))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        z1, z2 = x.chunk(2, 1)
        for node in self.nodes:
            z1, z2 = node(z1, z2)
        return torch.cat([z1, z2], 1)


def lite_transformer(p: Net) -> RestormerBlock:
    """The base (low-frequency) block: channel attention whose q/k/v projection is a dense
    3x3 conv, and a gated feed-forward whose 3x3 conv has ``hidden`` groups."""
    hidden = int(p.dim * p.base_ffn_factor)
    return RestormerBlock(p.dim, p.heads, p.base_ffn_factor, dense=True, ffn_groups=hidden)


class CDDFuse(nn.Module):
    def __init__(self, p: Net) -> None:
        super().__init__()
        self.params = p
        s2 = p.stem_stride ** 2
        self.embed = nn.Conv2d(s2, p.dim, 3, padding=1, bias=False)
        self.encoder = nn.ModuleList(RestormerBlock(p.dim, p.heads, p.ffn_factor)
                                     for _ in range(p.encoder_blocks))
        self.base = lite_transformer(p)
        self.detail = DetailBranch(p.dim, p.detail_layers, p.inn_expand)
        self.base_fuse = lite_transformer(p)
        self.detail_fuse = DetailBranch(p.dim, p.fuse_detail_layers, p.inn_expand)
        self.dec_reduce = nn.Conv2d(2 * p.dim, p.dim, 1, bias=False)
        self.decoder = nn.ModuleList(RestormerBlock(p.dim, p.heads, p.ffn_factor)
                                     for _ in range(p.decoder_blocks))
        self.head = nn.Conv2d(p.dim, s2 * HEAD_CHANNELS, 3, padding=1, bias=False)
        icnr_(self.head, p.stem_stride)
        self.head_full = nn.Conv2d(HEAD_CHANNELS, 1, 3, padding=1, bias=False)  # reconstruction
        # fusion: the decoder predicts per-pixel weights of the two-scale rule (a zero head is
        # the rule): the fused base/detail features decide how much of each source's base
        # and detail the image keeps
        self.fuse_head = zero_conv(HEAD_CHANNELS, 3)

    def idle(self, phase: int) -> tuple[str, ...]:
        """The head a phase does not use (the trainer freezes it)."""
        return ("fuse_head",) if phase == 1 else ("head_full",)

    @property
    def multiple(self) -> int:
        return self.params.stem_stride

    def encode(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(base, detail) features of padded input (N, 1, H, W)."""
        s = self.embed(F.pixel_unshuffle(x, self.params.stem_stride))
        for block in self.encoder:
            s = block(s)
        return self.base(s), self.detail(s)

    def _decoded(self, base: torch.Tensor, detail: torch.Tensor) -> torch.Tensor:
        """The decoder's full-resolution features of (base, detail) features."""
        x = self.dec_reduce(torch.cat([base, detail], 1))
        for block in self.decoder:
            x = block(x)
        return F.leaky_relu(F.pixel_shuffle(self.head(x), self.params.stem_stride))

    def decode(self, base: torch.Tensor, detail: torch.Tensor, skip: torch.Tensor
               ) -> torch.Tensor:
        """Reconstruction: sigmoid(head(decoder(base, detail)) + skip), a learned residual."""
        return torch.sigmoid(self.head_full(self._decoded(base, detail)) + skip)

    def _fused(self, base: torch.Tensor, detail: torch.Tensor, a: torch.Tensor,
               b: torch.Tensor) -> torch.Tensor:
        (ba, bb), (da, db) = base.chunk(2), detail.chunk(2)
        features = self._decoded(self.base_fuse(ba + bb), self.detail_fuse(da + db))
        p = self.params
        return learned_two_scale(self.fuse_head(features), a, b, p.prior_sigma,
                                 p.halo_limit)[0]

    def fuse(self, a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
        ap, (h, w) = pad_to(a, self.multiple)
        bp, _ = pad_to(b, self.multiple)
        base, detail = self.encode(torch.cat([ap, bp]))
        return self._fused(base, detail, ap, bp)[..., :h, :w]

    def forward(self, a: torch.Tensor, b: torch.Tensor, phase: int = 2) -> dict:
        """Training outputs (the patches need no padding: sides are multiples of 16)."""
        x = torch.cat([a, b])
        base, detail = self.encode(x)
        out = {"base": base.chunk(2), "detail": detail.chunk(2)}
        if phase == 1:
            out["rec"] = self.decode(base, detail, x).chunk(2)
            return out
        out["fused"] = self._fused(base, detail, a, b)
        with torch.no_grad():  # what the fusion stage is measured against
            out["reference"] = two_scale(a, b, self.params.prior_sigma, self.params.halo_limit)
        return out


def build(net: Net) -> CDDFuse:
    return CDDFuse(net)
