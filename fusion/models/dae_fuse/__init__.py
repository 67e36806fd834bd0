"""DAE-Fuse (two-phase discriminative autoencoder; DESIGN.md sections 2-3): its params
section ``model.dae-fuse`` and its registry entry. The torch code is in ``net.py``."""

from __future__ import annotations

from dataclasses import dataclass, field

from fusion.family import Family, Phase, WeightRange, register_family
from fusion.models.gate_weights import GateWeights, gate_space


@dataclass(frozen=True)
class Net:
    """Sizes (``model.dae-fuse.net``); the defaults are the CPU profile."""

    channels: int = 24  # C: width of the shallow encoder and the decoder
    stem_stride: int = 2  # lossless pixel-unshuffle before the encoder (1: full resolution)
    heads: int = 2  # channel-attention heads (Restormer blocks, cross-modality fusion)
    ffn_factor: float = 2.0  # gated-dconv feed-forward expansion
    fusion_ffn_factor: float = 0.0  # feed-forward after cross attention (0: none)
    se_blocks: int = 1  # Restormer blocks in the shallow encoder
    dhe_blocks: int = 2  # ResNet-18 basic blocks in the high-frequency encoder
    vit_patch: int = 8  # low-frequency encoder token stride (after the stem)
    vit_dim: int = 64
    vit_depth: int = 2
    vit_heads: int = 4
    decoder_blocks: int = 1
    disc_channels: int = 32
    disc_layers: int = 4
    # "prior": the decoder predicts per-pixel weights of the two-scale rule (the brighter
    # low-pass base plus both sources' detail; a zero head is the rule, docs/quality.md), so
    # phase II starts from the rule; "decoder": the paper's decoder writes the fused image
    fusion_head: str = "prior"
    prior_sigma: float = 3.0  # Gaussian sigma (pixels) that splits base from detail
    # "prior" head: at most (1 + halo_limit) x the brighter source, so that added detail
    # leaves no bright halo beside an edge and dark background stays dark
    halo_limit: float = 0.05

    def __post_init__(self) -> None:
        from fusion.errors import FusionError

        if self.channels % self.heads or self.vit_dim % self.vit_heads:
            raise FusionError("model.dae-fuse.net: channels and vit_dim must be divisible by "
                              "their numbers of heads")
        if self.fusion_head not in ("decoder", "prior"):
            raise FusionError("model.dae-fuse.net.fusion_head must be 'decoder' or 'prior'")


@dataclass(frozen=True)
class FeatureLoss:
    """Phase I: lam * L_adv + sigma * L_corr + (1 - sigma) * L_content."""

    lam: float = 0.1
    sigma: float = 0.2

    def __post_init__(self) -> None:
        from fusion.errors import FusionError

        if not 0.0 <= self.sigma <= 1.0:
            raise FusionError(f"model.dae-fuse.phase1.sigma must be in [0, 1], got {self.sigma}")


@dataclass(frozen=True)
class FusionLoss(GateWeights):
    """Phase II: the gate loss (``fusion.models.losses.gate_loss``: relative gains over the
    two-scale rule in VIF, Qabf, SSIM and SCD, w_vif ... w_scd, with ``guard`` times any
    loss in SD, SF, SCD or SSIM) plus the paper's w_text * L_text + w_int * L_int + w_adv *
    L_adv."""

    w_text: float = 0.0
    w_int: float = 0.0
    w_adv: float = 0.01
    int_sigma: float = 3.0  # L_int on Gaussian low-pass images of this sigma (0: the paper's)


def _space() -> list[WeightRange]:
    """Phase 2's weights (searches warm-start from a phase-1 model): the gate loss's and
    the family's own."""
    return [*gate_space(), WeightRange("phase2.w_adv", 0.001, 0.1, True)]


@dataclass(frozen=True)
class Config:
    """``model.dae-fuse``: sizes, the loss weights of each phase, the default search space."""

    net: Net = field(default_factory=Net)
    phase1: FeatureLoss = field(default_factory=FeatureLoss)
    phase2: FusionLoss = field(default_factory=FusionLoss)
    search: list[WeightRange] = field(default_factory=_space)


FAMILY = register_family(Family(
    name="dae-fuse",
    config=Config,
    phases=(Phase("features", frozen=("cross_a", "cross_b", "fuse_reduce", "fuse_head"),
                  adversarial=True, fuses=False),
            Phase("fusion", adversarial=True)),
    module="fusion.models.dae_fuse.net",
    losses="fusion.models.dae_fuse.losses",
    warm_phases=(2,),
    # The paper gives no sizes; these are the Restormer/CDDFuse widths it builds on.
    # tiny: tests and smoke runs
    profiles={"hour": {"train": {"steps": [700, 1700]}},  # about 40 min on Ray, 2 cores
              "tiny": {"net": {"channels": 8, "heads": 2, "se_blocks": 1, "dhe_blocks": 1,
                               "vit_patch": 4, "vit_dim": 16, "vit_depth": 1, "vit_heads": 2,
                               "decoder_blocks": 1, "disc_channels": 8, "disc_layers": 2,
                               "fusion_head": "decoder"}},
              "paper": {"net": {"channels": 64, "stem_stride": 1, "heads": 8,
                                "ffn_factor": 2.66, "se_blocks": 4, "dhe_blocks": 4,
                                "vit_patch": 16, "vit_dim": 256, "vit_depth": 4, "vit_heads": 8,
                                "decoder_blocks": 4, "disc_channels": 64,
                                "fusion_head": "decoder"}}},
    pretrained="pretrained",
), default=True)
