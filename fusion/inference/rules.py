"""Training-free fusion methods a user can run like a model (``fusion fuse --method``), and
that every learned model is measured against (``fusion evaluate``'s baselines)."""

from __future__ import annotations

from typing import TYPE_CHECKING

from fusion.params import TwoScaleParams

if TYPE_CHECKING:  # the CLI reads METHODS before any input is checked: nothing heavy here
    import numpy as np

METHODS = ("two-scale",)


class TwoScaleEngine:
    """The two-scale rule (``fusion.models.layers.two_scale``): the brighter source's
    Gaussian base plus both sources' detail, at most ``1 + ceiling`` times the brighter
    source. Thermal targets and CT bone keep their brightness, both sources their texture,
    and dark background stays dark."""

    explains = False

    def __init__(self, rule: TwoScaleParams) -> None:
        self.rule = rule

    def __call__(self, a: np.ndarray, b: np.ndarray) -> np.ndarray:
        """The fused plane (float64, as the baseline scores it) of two planes in [0, 1]."""
        import numpy as np
        import torch

        from fusion.models.layers import two_scale

        ta, tb = (torch.from_numpy(np.asarray(x, np.float64))[None, None] for x in (a, b))
        with torch.inference_mode():
            fused = two_scale(ta, tb, self.rule.sigma, self.rule.ceiling)
        return fused[0, 0].numpy()

    def explain(self, a: np.ndarray, b: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        raise NotImplementedError("the two-scale rule has no contribution map")
