"""The gate loss's weights, a part of every family's fusion-phase params section (torch-free:
params are read without torch); the loss itself is ``fusion.models.losses.gate_loss``."""

from __future__ import annotations

from dataclasses import dataclass

from fusion.family import WeightRange


@dataclass(frozen=True)
class GateWeights:
    """The gate loss's weights (``gate_loss``), shared by every family's fusion phase: the
    relative gains over the two-scale rule in VIF, Qabf, SSIM and SCD (the promotion gate's
    weights by default) and how much a loss in SD, SF, SCD or SSIM costs."""

    w_vif: float = 1.0
    w_qabf: float = 1.0
    w_ssim: float = 1.5
    w_scd: float = 1.0
    guard: float = 4.0
    w_distill: float = 0.0  # L1 to the fused image of ``train.teacher``
    noise: float = 0.0  # std of Gaussian sensor noise added to the network's inputs (0-1
    # scale); the losses and the rule they compare with see the clean sources, so detail
    # gains that amplify noise cost (what TNO's noisier sensors punish)

    def gains(self) -> dict[str, float]:
        return {"VIF": self.w_vif, "Qabf": self.w_qabf, "SSIM": self.w_ssim, "SCD": self.w_scd}


def gate_space() -> list[WeightRange]:
    """Where ``fusion search`` looks for the gate loss's weights (every family's phase 2)."""
    return [WeightRange("phase2.w_vif", 0.3, 3.0, True),
            WeightRange("phase2.w_qabf", 0.3, 3.0, True),
            WeightRange("phase2.w_ssim", 0.3, 5.0, True),
            WeightRange("phase2.w_scd", 0.2, 5.0, True),
            WeightRange("phase2.guard", 1.0, 10.0, True)]
