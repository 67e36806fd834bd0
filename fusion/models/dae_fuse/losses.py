"""DAE-Fuse's losses of each phase (DESIGN.md section 3)."""

from __future__ import annotations

import torch

from fusion.models import losses
from fusion.models.dae_fuse import FeatureLoss, FusionLoss


def losses_for(phase: int, a: torch.Tensor, b: torch.Tensor, out: dict,
               w: FeatureLoss | FusionLoss, d_fake: tuple[torch.Tensor, torch.Tensor]
               ) -> dict[str, torch.Tensor]:
    """Generator losses of a phase (DESIGN.md section 3); ``loss`` is what is minimised."""
    adv = losses.generator_adversarial(*d_fake)
    if phase == 1:
        (rec_a, rec_b), (hf_a, hf_b), (lf_a, lf_b) = out["rec"], out["hf"], out["lf"]
        corr = losses.decomposition_loss(hf_a, hf_b, lf_a, lf_b)
        content = losses.content_loss(a, rec_a) + losses.content_loss(b, rec_b)
        total = w.lam * adv + w.sigma * corr + (1 - w.sigma) * content
        return {"loss": total, "adv": adv, "corr": corr, "content": content}
    fused = out["fused"]
    text = losses.texture_loss(fused, a, b)
    inten = losses.intensity_loss(fused, a, b, w.int_sigma)
    gate, means = losses.gate_loss(fused, a, b, out["reference"], w)
    total = w.w_text * text + w.w_int * inten + w.w_adv * adv + gate
    return {"loss": total, "adv": adv, "text": text, "int": inten, **means}
