"""CDDFuse's losses of each stage (facts in docs/families.md)."""

from __future__ import annotations

import kornia.filters
import torch
import torch.nn.functional as F

from fusion.models import losses
from fusion.models.cddfuse import FusionLoss, ReconstructionLoss


def sobel_l1(x: torch.Tensor) -> torch.Tensor:
    """|Gx| + |Gy| of the unnormalised Sobel kernels (the fusion stage's gradient)."""
    return kornia.filters.spatial_gradient(x, normalized=False).abs().sum(2)


def losses_for(phase: int, a: torch.Tensor, b: torch.Tensor, out: dict,
               w: ReconstructionLoss | FusionLoss, d_fake=None) -> dict[str, torch.Tensor]:
    (base_a, base_b), (detail_a, detail_b) = out["base"], out["detail"]
    decomp = losses.decomposition_loss(detail_a, detail_b, base_a, base_b)
    if phase == 1:
        (rec_a, rec_b) = out["rec"]
        mse = F.mse_loss(rec_a, a) + F.mse_loss(rec_b, b)
        ssim = losses.ssim_loss(a, rec_a) + losses.ssim_loss(b, rec_b)
        grad = losses.gradient_loss(b, rec_b)
        total = w.w_mse * mse + w.w_ssim * ssim + w.w_grad * grad + w.w_decomp * decomp
        return {"loss": total, "mse": mse, "ssim": ssim, "grad": grad, "decomp": decomp}
    fused = out["fused"]
    inten = losses.intensity_loss(fused, a, b, w.int_sigma)
    grad = (sobel_l1(fused) - torch.maximum(sobel_l1(a), sobel_l1(b))).abs().mean()
    gate, means = losses.gate_loss(fused, a, b, out["reference"], w)
    total = w.w_int * inten + w.w_grad * grad + w.w_decomp * decomp + gate
    return {"loss": total, "int": inten, "grad": grad, "decomp": decomp, **means}
