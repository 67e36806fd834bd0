"""DAE-Fuse: shared encoder/decoder, cross-modality attention fusion, two discriminators.

Shapes are (N, 1, H, W) in [0, 1]. Inputs are padded to a multiple of the ViT patch (times
the stem stride) and cropped back, so any image size works. With ``stem_stride`` s > 1 the
encoder starts with a pixel-unshuffle (s x s pixels -> s^2 channels, lossless) and the
decoder ends with the inverse pixel-shuffle: every block then runs on 1/s^2 of the pixels,
which is what makes CPU inference affordable, while no input detail is thrown away.
Channel ("transposed") attention keeps the cost linear in pixels; the ViT runs on a coarse
token grid with 2-D sin-cos positions built for the actual grid size. Both attentions are
global; ``fusion.models.layers.GLOBAL_ATTENTION`` makes them exact under tiling.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from fusion.models.dae_fuse import Net
from fusion.models.layers import (
    GLOBAL_ATTENTION,
    BasicBlock,
    RestormerBlock,
    TokenBlock,
    icnr_,
    learned_two_scale,
    pad_to,
    shuffled_conv,
    sincos_positions,
    two_scale,
    zero_conv,
)


class LowFrequencyEncoder(nn.Module):
    """ViT on a coarse token grid (stride = patch), upsampled back to full resolution."""

    def __init__(self, dim: int, p: Net) -> None:
        super().__init__()
        self.patch = p.vit_patch
        self.embed = nn.Conv2d(dim, p.vit_dim, p.vit_patch, stride=p.vit_patch)
        self.blocks = nn.ModuleList(TokenBlock(p.vit_dim, p.vit_heads, mlp_ratio=2.0)
                                    for _ in range(p.vit_depth))
        self.norm = nn.LayerNorm(p.vit_dim)
        self.out = nn.Conv2d(p.vit_dim, dim, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        tokens = self.embed(x)
        n, d, gh, gw = tokens.shape
        tiles = GLOBAL_ATTENTION.get()
        if tiles is None:
            pos = sincos_positions((gh, gw), d, tokens.dtype, x.device)
        else:
            pos = tiles.positions(d, (gh, gw), tokens.dtype).to(x.device)
        t = tokens.flatten(2).transpose(1, 2) + pos
        for block in self.blocks:
            t = block(t) if tiles is None else tiles.token_block(block, t, (gh, gw))
        grid = self.norm(t).transpose(1, 2).reshape(n, d, gh, gw)
        return F.interpolate(self.out(grid), size=x.shape[-2:], mode="bilinear",
                             align_corners=False)


class DAEFuse(nn.Module):
    """Encoder (SE -> DHE || DLE), decoder RD and the cross-modality fusion layer."""

    def __init__(self, p: Net) -> None:
        super().__init__()
        self.params = p
        c, s2 = p.channels, p.stem_stride ** 2
        self.se_embed = nn.Conv2d(s2, c, 3, padding=1)
        self.se = nn.ModuleList(RestormerBlock(c, p.heads, p.ffn_factor)
                                for _ in range(p.se_blocks))
        self.dhe = nn.Sequential(*(BasicBlock(c) for _ in range(p.dhe_blocks)))
        self.dle = LowFrequencyEncoder(c, p)
        self.dec_reduce = nn.Conv2d(2 * c, c, 1)
        self.dec = nn.ModuleList(RestormerBlock(c, p.heads, p.ffn_factor)
                                 for _ in range(p.decoder_blocks))
        # shuffle to a few full-resolution channels and finish with a full-resolution conv:
        # a lone pixel-shuffle to one channel leaves a 2x2 checkerboard
        self.dec_out = nn.Conv2d(c, s2 * 8, 3, padding=1)
        icnr_(self.dec_out, p.stem_stride)
        self.dec_full = nn.Conv2d(8, 1, 3, padding=1)
        # fusion_head "prior": the decoder predicts per-pixel weights of the two-scale rule
        # (a zero head is the rule), so phase II starts from the rule and learns where to
        # depart from it
        self.fuse_head = zero_conv(8, 3) if p.fusion_head == "prior" else None
        self.cross_a = RestormerBlock(2 * c, p.heads, p.fusion_ffn_factor, cross=True)
        self.cross_b = RestormerBlock(2 * c, p.heads, p.fusion_ffn_factor, cross=True)
        self.fuse_reduce = nn.Conv2d(4 * c, 2 * c, 1)

    def idle(self, phase: int) -> tuple[str, ...]:
        """Parts this configuration does not use in a phase (the trainer freezes them)."""
        return ("dec_full",) if phase == 2 and self.fuse_head is not None else ()

    @property
    def multiple(self) -> int:
        """Input sides are padded to multiples of this."""
        return self.params.vit_patch * self.params.stem_stride

    def encode(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """High- and low-frequency features of padded input (N, 1, H, W)."""
        s = self.se_embed(F.pixel_unshuffle(x, self.params.stem_stride))
        for block in self.se:
            s = block(s)
        return self.dhe(s), self.dle(s)

    def _decoded(self, phi: torch.Tensor) -> torch.Tensor:
        """The decoder's feature map before the output conv, still pixel-unshuffled."""
        x = self.dec_reduce(phi)
        for block in self.dec:
            x = block(x)
        return F.gelu(self.dec_out(x))

    def decode(self, phi: torch.Tensor) -> torch.Tensor:
        return torch.sigmoid(shuffled_conv(self.dec_full, self._decoded(phi),
                                           self.params.stem_stride))

    def reconstruct(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Phase I: (reconstruction, high-freq features, low-freq features)."""
        xp, (h, w) = pad_to(x, self.multiple)
        hf, lf = self.encode(xp)
        return self.decode(torch.cat([hf, lf], 1))[..., :h, :w], hf, lf

    def fuse(self, a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
        """Phase II / inference: fused image from two same-size sources."""
        ap, (h, w) = pad_to(a, self.multiple)
        bp, _ = pad_to(b, self.multiple)
        hf, lf = self.encode(torch.cat([ap, bp], 0))  # one pass, shared weights
        phi_a, phi_b = torch.cat([hf, lf], 1).chunk(2, 0)
        fused = self.fuse_reduce(torch.cat([self.cross_a(phi_a, phi_b),
                                            self.cross_b(phi_b, phi_a)], 1))
        if self.fuse_head is None:
            return self.decode(fused)[..., :h, :w]
        p = self.params
        logits = shuffled_conv(self.fuse_head, self._decoded(fused), p.stem_stride)
        return learned_two_scale(logits, ap, bp, p.prior_sigma, p.halo_limit)[0][..., :h, :w]

    def forward(self, a: torch.Tensor, b: torch.Tensor, phase: int = 2) -> dict:
        """Training outputs of a phase (through forward, so that DDP sees every call)."""
        if phase == 1:
            rec, hf, lf = self.reconstruct(torch.cat([a, b]))
            (rec_a, rec_b), (hf_a, hf_b), (lf_a, lf_b) = rec.chunk(2), hf.chunk(2), lf.chunk(2)
            return {"rec": (rec_a, rec_b), "hf": (hf_a, hf_b), "lf": (lf_a, lf_b),
                    "fakes": (rec_a, rec_b)}
        fused = self.fuse(a, b)
        with torch.no_grad():  # what phase II is measured against
            reference = two_scale(a, b, self.params.prior_sigma, self.params.halo_limit)
        return {"fused": fused, "fakes": (fused, fused), "reference": reference}


class Discriminator(nn.Module):
    """Strided Conv-LeakyReLU-BatchNorm stack, global pooling, one logit per image."""

    def __init__(self, p: Net) -> None:
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


class Discriminators(nn.Module):
    """DM1 (source A) and DM2 (source B) as one module, so DDP wraps them together."""

    def __init__(self, p: Net) -> None:
        super().__init__()
        self.d1, self.d2 = Discriminator(p), Discriminator(p)

    def forward(self, a: torch.Tensor, b: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        return self.d1(a), self.d2(b)


def build(net: Net) -> DAEFuse:
    return DAEFuse(net)


def build_critic(net: Net) -> Discriminators:
    return Discriminators(net)
