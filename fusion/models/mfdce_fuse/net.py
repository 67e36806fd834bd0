"""MFDCE-Fuse as we read its abstract: a CNN + Swin auto-encoder whose features split into
modal-common and modal-private parts, and a fused image in which each source counts by its
contribution, the share of private-feature energy at each pixel.

    w_A = E_A^g / (E_A^g + E_B^g),  E_x = box-mean over ``smooth`` cells of |private_x|^2
    F   = w * base_A + (1 - w) * base_B + g_A * detail_A + g_B * detail_B
    w   = sigmoid(50 (base_A - base_B) + logit(w_A))

(``fusion.models.layers.learned_two_scale``: Gaussian bases and details, at most a little
above the brighter source). The contribution shifts the base weight away from the
brighter-base rule; the detail gains ``g`` come from the private features too (one
convolution). Both start at zero, so the contribution phase starts from the rule. No
black-box decoder makes the fused image: the contribution map is the explanation
(``explain``), and where both sources are dark the fused pixel is dark. The decoder only
serves the auto-encoder phase. Every layer is local (convolutions, shifted-window attention
on a grid aligned to ``multiple``), so tiles reproduce the whole image.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from fusion.models.layers import (
    BasicBlock,
    WindowBlock,
    icnr_,
    learned_two_scale,
    pad_to,
    two_scale,
    zero_conv,
)
from fusion.models.mfdce_fuse import Net

HEAD_CHANNELS = 8
EPS = 1e-8


def swin(p: Net) -> nn.Sequential:
    """Swin blocks, every other one with shifted windows."""
    return nn.Sequential(*(WindowBlock(p.channels, p.swin_heads, p.window,
                                       (p.window // 2) * (i % 2), p.mlp_ratio)
                           for i in range(p.swin_blocks)))


class Contribution(nn.Module):
    """How much more source A contributes than B, per cell, from the private features of
    both: ``g * (log E_A - log E_B)``, the logit of E_A^g / (E_A^g + E_B^g). ``g`` starts
    at zero, so the base weight starts as the brighter-base rule and training decides how
    far the private-energy share moves it."""

    def __init__(self, smooth: int) -> None:
        super().__init__()
        self.smooth = smooth
        self.gamma = nn.Parameter(torch.zeros(()))

    def forward(self, private_a: torch.Tensor, private_b: torch.Tensor) -> torch.Tensor:
        energy = torch.stack([private_a.square().mean(1), private_b.square().mean(1)], 1)
        energy = F.avg_pool2d(energy, self.smooth, stride=1, padding=self.smooth // 2,
                              count_include_pad=False)
        log_a, log_b = torch.log(energy + EPS).chunk(2, 1)
        return self.gamma * (log_a - log_b)


class MFDCEFuse(nn.Module):
    def __init__(self, p: Net) -> None:
        super().__init__()
        self.params = p
        c, s2, half = p.channels, p.stem_stride ** 2, p.channels // 2
        self.embed = nn.Conv2d(s2, c, 3, padding=1)
        self.cnn = nn.Sequential(*(BasicBlock(c) for _ in range(p.cnn_blocks)))
        self.swin = swin(p)
        self.merge = nn.Conv2d(2 * c, c, 1)
        self.common = nn.Sequential(nn.Conv2d(c, half, 3, padding=1), nn.GELU(),
                                    nn.Conv2d(half, half, 1))
        self.private = nn.Sequential(nn.Conv2d(c, half, 3, padding=1), nn.GELU(),
                                     nn.Conv2d(half, half, 1))
        self.contribution = Contribution(p.smooth)
        self.detail_gain = zero_conv(2 * half, 2)  # log detail gains of A, B
        self.decoder = nn.Sequential(nn.Conv2d(c, c, 1),
                                     *(BasicBlock(c) for _ in range(p.decoder_blocks)))
        self.head = nn.Conv2d(c, s2 * HEAD_CHANNELS, 3, padding=1)
        icnr_(self.head, p.stem_stride)
        self.head_full = nn.Conv2d(HEAD_CHANNELS, 1, 3, padding=1)

    @property
    def multiple(self) -> int:
        return self.params.stem_stride * self.params.window

    def trunk(self, x: torch.Tensor) -> torch.Tensor:
        """Encoder features: the CNN and Swin branches side by side, merged."""
        s = self.embed(F.pixel_unshuffle(x, self.params.stem_stride))
        return self.merge(torch.cat([self.cnn(s), self.swin(s)], 1))

    def split(self, z: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(common, private) parts of trunk features."""
        return self.common(z), self.private(z)

    def decode(self, common: torch.Tensor, private: torch.Tensor) -> torch.Tensor:
        x = F.pixel_shuffle(self.head(self.decoder(torch.cat([common, private], 1))),
                            self.params.stem_stride)
        return torch.sigmoid(self.head_full(F.gelu(x)))

    def _full(self, x: torch.Tensor) -> torch.Tensor:
        return F.interpolate(x, scale_factor=self.params.stem_stride, mode="bilinear",
                             align_corners=False)

    def combine(self, private: torch.Tensor, a: torch.Tensor, b: torch.Tensor
                ) -> tuple[torch.Tensor, torch.Tensor]:
        """(fused image, contribution of A) from the private parts of [A; B]: the
        contribution shifts the base weight, the detail gains weigh the details."""
        pa, pb = private.chunk(2)
        logits = torch.cat([self.contribution(pa, pb), self.detail_gain(torch.cat([pa, pb], 1))],
                           1)
        p = self.params
        return learned_two_scale(self._full(logits), a, b, p.prior_sigma, p.halo_limit)

    def explain(self, a: torch.Tensor, b: torch.Tensor) -> dict[str, torch.Tensor]:
        """The fused image and the contribution map of A (B's is 1 minus it)."""
        ap, (h, w) = pad_to(a, self.multiple)
        bp, _ = pad_to(b, self.multiple)
        _, private = self.split(self.trunk(torch.cat([ap, bp])))
        fused, weight = self.combine(private, ap, bp)
        return {"fused": fused[..., :h, :w], "contribution": weight[..., :h, :w]}

    def fuse(self, a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
        return self.explain(a, b)["fused"]

    def forward(self, a: torch.Tensor, b: torch.Tensor, phase: int = 2) -> dict:
        x = torch.cat([a, b])
        z = self.trunk(x)
        common, private = self.split(z)
        out = {"z": z.chunk(2), "common": common.chunk(2), "private": private.chunk(2)}
        if phase == 1:
            ca, cb = out["common"]
            rec = self.decode(common, private)
            out["rec"] = rec.chunk(2)
            out["swap"] = self.decode(torch.cat([cb, ca]), private).chunk(2)
            out["z_rec"] = self.trunk(rec).chunk(2)
            return out
        fused, weight = self.combine(private, a, b)
        out.update(fused=fused, weight=weight, z_fused=self.trunk(fused))
        with torch.no_grad():  # what the contribution phase is measured against
            out["reference"] = two_scale(a, b, self.params.prior_sigma, self.params.halo_limit)
        return out


def build(net: Net) -> MFDCEFuse:
    return MFDCEFuse(net)
