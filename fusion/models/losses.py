"""Loss terms the families share, each a small function of tensors.

Images are (N, 1, H, W) in [0, 1]; discriminator outputs are logits (N,). The formulas are
DESIGN.md section 3 and docs/families.md (which family uses which).
"""

from __future__ import annotations

import kornia.filters
import kornia.metrics
import torch
import torch.nn.functional as F

from fusion.metric_names import GUARDED
from fusion.models.gate_weights import GateWeights
from fusion.models.layers import low_pass


def bce(logits: torch.Tensor, real: bool) -> torch.Tensor:
    target = torch.ones_like(logits) if real else torch.zeros_like(logits)
    return F.binary_cross_entropy_with_logits(logits, target)


def correlation(x: torch.Tensor, y: torch.Tensor, eps: float = 1e-6) -> torch.Tensor:
    """Mean over samples and channels of the Pearson correlation of two feature maps."""
    x = x.flatten(2) - x.flatten(2).mean(-1, keepdim=True)
    y = y.flatten(2) - y.flatten(2).mean(-1, keepdim=True)
    cc = (x * y).sum(-1) / (x.norm(dim=-1) * y.norm(dim=-1) + eps)
    return cc.clamp(-1.0, 1.0).mean()


def decomposition_loss(detail_a, detail_b, base_a, base_b) -> torch.Tensor:
    """CC(detail_a, detail_b)^2 / (CC(base_a, base_b) + 1.01): decorrelate the modalities'
    high-frequency (detail) features, correlate the low-frequency (base) ones (the
    correlation-driven decomposition loss; DESIGN.md eq. 8)."""
    return correlation(detail_a, detail_b) ** 2 / (correlation(base_a, base_b) + 1.01)


def ssim_loss(x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """1 - SSIM (11x11 Gaussian window, kornia)."""
    return 1.0 - kornia.metrics.ssim(x, y, window_size=11, max_val=1.0).mean()


def content_loss(x: torch.Tensor, x_rec: torch.Tensor) -> torch.Tensor:
    """||x - x~||^2 + (1 - SSIM(x, x~)) for one modality (DESIGN.md eq. 9)."""
    return F.mse_loss(x_rec, x) + ssim_loss(x, x_rec)


def gradient_loss(x: torch.Tensor, x_rec: torch.Tensor) -> torch.Tensor:
    """L1 between the (normalised Sobel) spatial gradients of two images (a reconstruction term)."""
    return F.l1_loss(kornia.filters.spatial_gradient(x_rec), kornia.filters.spatial_gradient(x))


def texture_loss(f: torch.Tensor, a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """L_text = mean | |grad F| - max(|grad a|, |grad b|) | with Sobel gradients (eq. 15)."""
    grad = kornia.filters.sobel
    return (grad(f) - torch.maximum(grad(a), grad(b))).abs().mean()


def intensity_loss(f: torch.Tensor, a: torch.Tensor, b: torch.Tensor,
                   sigma: float = 0.0) -> torch.Tensor:
    """L_int = mean |F - max(a, b)| (eq. 16), compared on low-pass images when ``sigma`` > 0:
    the brighter source sets the *base* intensity and the texture term sets the detail, so
    the two terms no longer pull the detail in different directions."""
    fl, al, bl = (low_pass(x, sigma) for x in (f, a, b))
    return (fl - torch.maximum(al, bl)).abs().mean()


def discriminator_loss(d1_real, d1_fake, d2_real, d2_fake) -> torch.Tensor:
    """L_D = BCE(D1(real a), 1) + BCE(D1(fake), 0) + BCE(D2(real b), 1) + BCE(D2(fake), 0)."""
    return bce(d1_real, True) + bce(d1_fake, False) + bce(d2_real, True) + bce(d2_fake, False)


def generator_adversarial(d1_fake, d2_fake) -> torch.Tensor:
    """Non-saturating generator loss BCE(D1(fake), 1) + BCE(D2(fake), 1)."""
    return bce(d1_fake, True) + bce(d2_fake, True)


def info_nce(queries: torch.Tensor, keys: torch.Tensor, temperature: float = 0.1
             ) -> torch.Tensor:
    """InfoNCE over a batch: row i of ``queries`` should match row i of ``keys`` better than
    any other row (cosine similarity / temperature, cross-entropy). (N, D) each."""
    q, k = F.normalize(queries.flatten(1), dim=1), F.normalize(keys.flatten(1), dim=1)
    logits = q @ k.t() / temperature
    return F.cross_entropy(logits, torch.arange(q.shape[0], device=q.device))


FLOORS = {"VIF": 0.05, "Qabf": 0.05, "SSIM": 0.05, "SCD": 0.05, "SD": 1.0, "SF": 0.5}


def gate_loss(f: torch.Tensor, a: torch.Tensor, b: torch.Tensor, reference: torch.Tensor,
              weights: GateWeights) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """Training aimed at what the promotion gate and the papers measure, with the
    evaluator's own metric definitions (``fusion.metrics``, 0-255 scale, per patch).

    Each metric enters as its relative gain over ``reference`` (the training-free
    two-scale rule on the same patch, as the gate compares with its floor): the loss is
    minus the ``gains``-weighted gains (VIF, Qabf, SSIM, SCD), plus ``guard`` times every
    loss in SD, SF, SCD or SSIM. The gains alone are won by copying one source (VIF and MI
    reward it); the guard makes that a loss, so the model has to improve on the rule
    without giving up either source's contrast, detail or structure.
    Returns (loss, each metric's mean relative gain)."""
    from fusion import metrics

    gains = weights.gains()
    names = tuple(dict.fromkeys([*(m for m, w in gains.items() if w), *GUARDED]))
    with torch.no_grad():
        ref = metrics.compute(*(x.squeeze(1).float() * 255.0 for x in (reference, a, b)),
                              names=names)
    ours = metrics.compute(*(x.squeeze(1).float() * 255.0 for x in (f, a, b)), names=names)
    rel = {m: (ours[m] - ref[m]) / ref[m].abs().clamp_min(FLOORS[m]) for m in names}
    loss = -sum(w * rel[m].mean() for m, w in gains.items() if w)
    loss = loss + weights.guard * sum(torch.relu(-rel[m]).mean() for m in GUARDED)
    return loss.to(f.dtype), {m: rel[m].mean() for m in names}
