"""Validation score of the loss-weight search: fused held-out pairs against a baseline.

The held-out pairs are the manifest's ``val`` split (never trained on, never a benchmark
test pair). The score is the weighted mean relative gain (``fusion.evaluation.gain``) of
the model's metric means over a training-free baseline of the same pairs
(``search.baseline``, the two-scale rule by default, as the promotion floor): 0 means "as
good as the baseline", so metrics on different scales combine. Each loss in SD, SF, SCD
or SSIM against the baseline costs ``search.guard`` times itself, as in the gate loss.
"""

from __future__ import annotations

import math

import numpy as np

from fusion.data.prepared import split_pairs
from fusion.errors import FusionError
from fusion.evaluation.evaluate import baselines
from fusion.evaluation.gain import guarded_gain, means
from fusion.evaluation.scoring import read_grey, score_arrays
from fusion.inference.fuse import Engine
from fusion.params import Params

FAILED = -1e9  # score of a diverged model (finite: Optuna and MLflow reject NaN)


def held_out_pairs(params: Params) -> list[tuple[str, np.ndarray, np.ndarray]]:
    """(id, a, b) of the manifest's ``val`` pairs (``search.val_pairs``), read here as grey
    arrays: the manifest is wherever ``train.data`` is (a folder or S3), the images are
    under ``data.raw`` on this machine, and the trials that score them may run on nodes
    that have neither."""
    pairs = split_pairs(params.train.data, params.ray.storage_endpoint, "val", params.data.raw)
    if not pairs:
        raise FusionError(f"{params.train.data}: no held-out (split 'val') pairs to score a "
                          "search trial on; raise data.val_ratio")
    limit = params.search.val_pairs
    return [(pair, read_grey(a), read_grey(b)) for pair, a, b in
            (pairs[:limit] if limit else pairs)]


class ValidationScore:
    """Scores a model on fixed held-out pairs; the baseline is computed once."""

    def __init__(self, pairs: list[tuple[str, np.ndarray, np.ndarray]], params: Params) -> None:
        self.params = params
        self.sources = [(a, b) for _, a, b in pairs]
        rule, reference = params.evaluate.two_scale, params.search.baseline
        self.baseline = self._means([np.round(baselines(a, b, rule)[reference])
                                     for a, b in self.sources])

    def _means(self, fused: list[np.ndarray]) -> dict[str, float]:
        return means([score_arrays(f, a, b, self.params.metrics)
                      for f, (a, b) in zip(fused, self.sources, strict=True)])

    def __call__(self, engine: Engine) -> tuple[float, dict[str, float]]:
        """(score, metric means) of a model; a model giving NaN scores ``FAILED``."""
        fused = [np.round(engine(a / 255.0, b / 255.0) * 255.0) for a, b in self.sources]
        scores = self._means(fused)
        search = self.params.search
        score = guarded_gain(scores, self.baseline, search.score, search.guard)
        return (score if math.isfinite(score) else FAILED), scores
