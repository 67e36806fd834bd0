"""MFDCE-Fuse (Zhang et al., IEEE TIM 2025): modal feature disentanglement and contribution
estimation. Only the abstract is public: every choice it leaves open is ours, listed in
``docs/families.md``. Params section ``model.mfdce-fuse`` and registry entry here; the
torch code is in ``net.py``.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from fusion.family import Family, Phase, WeightRange, register_family
from fusion.models.gate_weights import GateWeights, gate_space


@dataclass(frozen=True)
class Net:
    """Sizes (``model.mfdce-fuse.net``); the defaults are the CPU profile."""

    channels: int = 24  # trunk width; common and private parts get half each
    stem_stride: int = 2  # lossless pixel-unshuffle before the encoder (1: full resolution)
    cnn_blocks: int = 2  # residual conv blocks (local texture branch)
    swin_blocks: int = 2  # Swin Transformer blocks (long-range branch), shifted every other
    swin_heads: int = 2
    window: int = 8  # Swin window side, in feature cells
    mlp_ratio: float = 2.0
    decoder_blocks: int = 2  # residual conv blocks of the reconstruction decoder
    smooth: int = 5  # contribution: private energy averaged over smooth x smooth cells
    prior_sigma: float = 3.0  # Gaussian sigma splitting each source's base from its detail
    halo_limit: float = 0.05  # fused at most (1 + this) x the brighter source

    def __post_init__(self) -> None:
        from fusion.errors import FusionError

        if self.channels % (2 * self.swin_heads) or self.channels % 2:
            raise FusionError("model.mfdce-fuse.net: channels must be even and divisible by "
                              "swin_heads")
        if self.smooth % 2 == 0:
            raise FusionError("model.mfdce-fuse.net.smooth must be odd")


@dataclass(frozen=True)
class AutoencoderLoss:
    """Phase 1: reconstruction (L1 + 1-SSIM), the contrastive reconstruction loss (InfoNCE:
    a reconstruction's embedding matches its own source, not the batch's other patches),
    swapped-common reconstruction, and the disentanglement contrastive loss."""

    w_rec: float = 1.0
    w_contrast: float = 0.1
    w_swap: float = 0.5
    w_disentangle: float = 0.1
    temperature: float = 0.1


@dataclass(frozen=True)
class FusionLoss(GateWeights):
    """Phase 2: the gate loss (``fusion.models.losses.gate_loss``), the contribution-weighted
    perceptual loss (in our own frozen encoder's feature space), texture and low-pass
    intensity terms, and the disentanglement loss. The gate weights are the ones this
    family's search study found (docs/quality.md): they beat the shared defaults on every
    full set, in two seeds."""

    w_vif: float = 0.413
    w_qabf: float = 2.71
    w_ssim: float = 2.31
    w_scd: float = 0.631
    guard: float = 1.61
    w_percep: float = 1.29
    w_text: float = 0.0
    w_int: float = 0.0
    w_disentangle: float = 0.1
    int_sigma: float = 3.0
    temperature: float = 0.1


def _space() -> list[WeightRange]:
    """Phase 2's weights (searches warm-start from a phase-1 model): the gate loss's and
    the family's own."""
    return [*gate_space(), WeightRange("phase2.w_percep", 0.1, 10.0, True)]


@dataclass(frozen=True)
class Config:
    """``model.mfdce-fuse``: sizes, the loss weights of each phase, the default search space."""

    net: Net = field(default_factory=Net)
    phase1: AutoencoderLoss = field(default_factory=AutoencoderLoss)
    phase2: FusionLoss = field(default_factory=FusionLoss)
    search: list[WeightRange] = field(default_factory=_space)


FAMILY = register_family(Family(
    name="mfdce-fuse",
    config=Config,
    phases=(Phase("autoencoder", frozen=("contribution", "detail_gain"), fuses=False),
            Phase("contribution", frozen=("embed", "cnn", "swin", "merge", "decoder", "head",
                                          "head_full"))),
    module="fusion.models.mfdce_fuse.net",
    losses="fusion.models.mfdce_fuse.losses",
    warm_phases=(2,),
    explains=True,
    # tiny: tests and smoke runs
    profiles={"hour": {"train": {"steps": [450, 2500]}},  # about 40 min on Ray, 2 cores
              "tiny": {"net": {"channels": 8, "cnn_blocks": 1, "swin_blocks": 2,
                               "swin_heads": 2, "window": 4, "decoder_blocks": 1, "smooth": 3}},
              "paper": {"net": {"channels": 64, "stem_stride": 1, "cnn_blocks": 4,
                                "swin_blocks": 4, "swin_heads": 4, "decoder_blocks": 4}}},
))
