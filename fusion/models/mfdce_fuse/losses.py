"""MFDCE-Fuse's losses of each phase (our reading of the abstract: docs/families.md)."""

from __future__ import annotations

import torch
import torch.nn.functional as F

from fusion.models import losses
from fusion.models.mfdce_fuse import AutoencoderLoss, FusionLoss


def _embed(z: torch.Tensor) -> torch.Tensor:
    """One vector per patch: global average of a feature map."""
    return z.mean((2, 3))


def disentangle_loss(out: dict, temperature: float) -> torch.Tensor:
    """Common parts of A and B of one patch match each other better than other patches'
    (InfoNCE both ways); private parts are orthogonal to each other and to the common ones
    (mean squared cosine per pixel)."""
    (ca, cb), (pa, pb) = out["common"], out["private"]
    nce = (losses.info_nce(_embed(ca), _embed(cb), temperature)
           + losses.info_nce(_embed(cb), _embed(ca), temperature)) / 2

    def cos2(x, y):
        return F.cosine_similarity(x, y, dim=1, eps=1e-6).square().mean()
    return nce + cos2(pa, pb) + (cos2(ca, pa) + cos2(cb, pb)) / 2


def losses_for(phase: int, a: torch.Tensor, b: torch.Tensor, out: dict,
               w: AutoencoderLoss | FusionLoss, d_fake=None) -> dict[str, torch.Tensor]:
    disentangle = disentangle_loss(out, w.temperature)
    if phase == 1:
        (rec_a, rec_b), (swap_a, swap_b) = out["rec"], out["swap"]
        rec = sum(F.l1_loss(r, x) + losses.ssim_loss(x, r) for r, x in ((rec_a, a), (rec_b, b)))
        swap = F.l1_loss(swap_a, a) + F.l1_loss(swap_b, b)
        contrast = sum(losses.info_nce(_embed(zr), _embed(z), w.temperature)
                       for zr, z in zip(out["z_rec"], out["z"], strict=True)) / 2
        total = (w.w_rec * rec + w.w_contrast * contrast + w.w_swap * swap
                 + w.w_disentangle * disentangle)
        return {"loss": total, "rec": rec, "contrast": contrast, "swap": swap,
                "disentangle": disentangle}
    fused, weight = out["fused"], out["weight"]
    (za, zb), zf = out["z"], out["z_fused"]
    cell = F.avg_pool2d(weight, weight.shape[-1] // zf.shape[-1])  # weight per feature cell
    percep = (cell * (zf - za).abs() + (1 - cell) * (zf - zb).abs()).mean()
    text = losses.texture_loss(fused, a, b)
    inten = losses.intensity_loss(fused, a, b, w.int_sigma)
    gate, means = losses.gate_loss(fused, a, b, out["reference"], w)
    total = (w.w_percep * percep + w.w_text * text + w.w_int * inten
             + w.w_disentangle * disentangle + gate)
    return {"loss": total, "percep": percep, "text": text, "int": inten,
            "disentangle": disentangle, **means}
