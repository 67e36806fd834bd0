"""DAE-Fuse losses (DESIGN.md section 3), each a small function of tensors.

Images are (N, 1, H, W) in [0, 1]; discriminator outputs are logits (N,).
"""

from __future__ import annotations

import kornia.filters
import kornia.metrics
import torch
import torch.nn.functional as F


def bce(logits: torch.Tensor, real: bool) -> torch.Tensor:
    target = torch.ones_like(logits) if real else torch.zeros_like(logits)
    return F.binary_cross_entropy_with_logits(logits, target)


def correlation(x: torch.Tensor, y: torch.Tensor, eps: float = 1e-6) -> torch.Tensor:
    """Mean over samples and channels of the Pearson correlation of two feature maps."""
    x = x.flatten(2) - x.flatten(2).mean(-1, keepdim=True)
    y = y.flatten(2) - y.flatten(2).mean(-1, keepdim=True)
    cc = (x * y).sum(-1) / (x.norm(dim=-1) * y.norm(dim=-1) + eps)
    return cc.clamp(-1.0, 1.0).mean()


def decomposition_loss(hf_a, hf_b, lf_a, lf_b) -> torch.Tensor:
    """L_corr = CC(DHE_a, DHE_b)^2 / (CC(DLE_a, DLE_b) + 1.01): decorrelate high-frequency
    features across modalities, correlate low-frequency ones (eq. 8, from CDDFuse)."""
    return correlation(hf_a, hf_b) ** 2 / (correlation(lf_a, lf_b) + 1.01)


def content_loss(x: torch.Tensor, x_rec: torch.Tensor) -> torch.Tensor:
    """||x - x~||^2 + (1 - SSIM(x, x~)) for one modality (eq. 9); SSIM from kornia."""
    ssim = kornia.metrics.ssim(x, x_rec, window_size=11, max_val=1.0).mean()
    return F.mse_loss(x_rec, x) + (1.0 - ssim)


def texture_loss(f: torch.Tensor, a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """L_text = mean | |grad F| - max(|grad a|, |grad b|) | with Sobel gradients (eq. 15)."""
    grad = kornia.filters.sobel
    return (grad(f) - torch.maximum(grad(a), grad(b))).abs().mean()


def intensity_loss(f: torch.Tensor, a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """L_int = mean |F - max(a, b)| (eq. 16)."""
    return (f - torch.maximum(a, b)).abs().mean()


def discriminator_loss(d1_real, d1_fake, d2_real, d2_fake) -> torch.Tensor:
    """L_D = BCE(D1(real a), 1) + BCE(D1(fake), 0) + BCE(D2(real b), 1) + BCE(D2(fake), 0)."""
    return bce(d1_real, True) + bce(d1_fake, False) + bce(d2_real, True) + bce(d2_fake, False)


def generator_adversarial(d1_fake, d2_fake) -> torch.Tensor:
    """Non-saturating generator loss BCE(D1(fake), 1) + BCE(D2(fake), 1)."""
    return bce(d1_fake, True) + bce(d2_fake, True)
