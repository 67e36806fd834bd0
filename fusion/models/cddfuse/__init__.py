"""CDDFuse (Zhao et al., CVPR 2023): correlation-driven dual-branch feature decomposition.

Its params section ``model.cddfuse`` and its registry entry; the torch code is in
``net.py``. Facts (architecture, losses, training) were read from the paper's public code;
``docs/families.md`` lists them and where our version differs.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from fusion.family import Family, Phase, WeightRange, register_family
from fusion.models.gate_weights import GateWeights, gate_space


@dataclass(frozen=True)
class Net:
    """Sizes (``model.cddfuse.net``); the defaults are a CPU profile, ``paper`` the paper's."""

    dim: int = 24  # feature width (paper 64)
    heads: int = 4  # attention heads, Restormer and Lite-Transformer blocks (paper 8)
    stem_stride: int = 2  # lossless pixel-unshuffle before the encoder (paper: 1)
    encoder_blocks: int = 1  # Restormer blocks of the shallow encoder (paper 4)
    decoder_blocks: int = 1  # Restormer blocks of the decoder (paper 4)
    ffn_factor: float = 2.0  # Restormer feed-forward expansion (paper 2)
    base_ffn_factor: float = 1.0  # Lite-Transformer feed-forward expansion (paper 1)
    detail_layers: int = 2  # INN coupling nodes of the detail encoder (paper 3)
    fuse_detail_layers: int = 1  # INN nodes of the detail fusion layer (paper 1)
    inn_expand: int = 2  # inverted-residual expansion inside each coupling (paper 2)
    prior_sigma: float = 3.0  # fusion head: Gaussian sigma splitting base from detail
    halo_limit: float = 0.05  # fusion head: at most (1 + this) x the brighter source

    def __post_init__(self) -> None:
        from fusion.errors import FusionError

        if self.dim % self.heads or self.dim % 2:
            raise FusionError("model.cddfuse.net: dim must be even and divisible by heads")


@dataclass(frozen=True)
class ReconstructionLoss:
    """Stage I, per modality w_mse * MSE + w_ssim * (1 - SSIM), plus w_grad * L1 of the
    gradients of B and w_decomp * the decomposition loss (code: 1, 5/2, 5, 2)."""

    w_mse: float = 1.0
    w_ssim: float = 2.5
    w_grad: float = 5.0
    w_decomp: float = 2.0


@dataclass(frozen=True)
class FusionLoss(GateWeights):
    """Stage II: the gate loss (``fusion.models.losses.gate_loss``) plus the paper's w_int *
    |F - max(A, B)| + w_grad * |grad F - max(grad A, grad B)| + w_decomp * the
    decomposition loss (code: 1, 10, 2)."""

    w_int: float = 0.0
    w_grad: float = 0.0
    w_decomp: float = 2.0
    int_sigma: float = 0.0  # intensity term on Gaussian low-pass images (0: as the paper)


def _space() -> list[WeightRange]:
    """Phase 2's weights (searches warm-start from a phase-1 model): the gate loss's and
    the family's own."""
    return [*gate_space(), WeightRange("phase2.w_decomp", 0.2, 5.0, True)]


@dataclass(frozen=True)
class Config:
    """``model.cddfuse``: sizes, the loss weights of each stage, the default search space."""

    net: Net = field(default_factory=Net)
    phase1: ReconstructionLoss = field(default_factory=ReconstructionLoss)
    phase2: FusionLoss = field(default_factory=FusionLoss)
    search: list[WeightRange] = field(default_factory=_space)


FAMILY = register_family(Family(
    name="cddfuse",
    config=Config,
    phases=(Phase("reconstruction", frozen=("base_fuse", "detail_fuse"), fuses=False),
            Phase("fusion")),
    module="fusion.models.cddfuse.net",
    losses="fusion.models.cddfuse.losses",
    warm_phases=(2,),
    # tiny: tests and smoke runs
    profiles={"hour": {"train": {"steps": [500, 1700]}},  # about 40 min on Ray, 2 cores
              "tiny": {"net": {"dim": 8, "heads": 2, "encoder_blocks": 1, "decoder_blocks": 1,
                               "detail_layers": 1, "fuse_detail_layers": 1}},
              "paper": {"net": {"dim": 64, "heads": 8, "stem_stride": 1, "encoder_blocks": 4,
                                "decoder_blocks": 4, "detail_layers": 3}}},
))
