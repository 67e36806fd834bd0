"""Validation score of the loss-weight search: fused held-out pairs against mean fusion.

The held-out pairs are the manifest's ``val`` split (never trained on, never a benchmark
test pair). Each weighted metric enters as its relative gain over mean fusion (A+B)/2 of
the same pairs (sign flipped where lower is better), so metrics on different scales
combine, and 0 means "as good as mean fusion".
"""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq
import torch

from fusion import metrics
from fusion.errors import FusionError
from fusion.inference import fuse_tensors
from fusion.model import DAEFuse
from fusion.params import MetricWeight, Params
from fusion.scoring import read_grey, score_arrays

LOWER_IS_BETTER = {"MSE"}
FAILED = -1e9  # score of a diverged model (finite: Optuna and MLflow reject NaN)


def held_out_pairs(params: Params) -> list[tuple[str, Path, Path]]:
    """(id, a, b) of the manifest's ``val`` pairs as absolute paths (``search.val_pairs``)."""
    manifest = Path(params.train.data) / "manifest.parquet"
    if not manifest.exists():
        raise FusionError(f"{manifest}: no prepared dataset (run `fusion prepare` first)")
    roots = {Path(r).name: Path(r).resolve().parent for r in params.data.raw}
    pairs = []
    for row in pq.read_table(manifest).to_pylist():
        if row["split"] != "val":
            continue
        base = roots.get(Path(row["a_path"]).parts[0])
        if base is None:
            raise FusionError(f"{manifest}: pair {row['id']} is not under any data.raw root")
        pairs.append((row["id"], base / row["a_path"], base / row["b_path"]))
    if not pairs:
        raise FusionError(f"{manifest}: no held-out (split 'val') pairs to score a search "
                          "trial on; raise data.val_ratio")
    limit = params.search.val_pairs
    return pairs[:limit] if limit else pairs


def relative_score(ours: dict[str, float], base: dict[str, float],
                   weights: list[MetricWeight]) -> float:
    """Weighted mean relative gain of ``ours`` over ``base``."""
    total = weight_sum = 0.0
    for w in weights:
        gain = (ours[w.metric] - base[w.metric]) / max(abs(base[w.metric]), 1e-12)
        total += w.weight * (-gain if w.metric in LOWER_IS_BETTER else gain)
        weight_sum += w.weight
    return total / weight_sum if weight_sum else 0.0


class ValidationScore:
    """Scores a model on fixed held-out pairs; the mean-fusion baseline is computed once."""

    def __init__(self, pairs: list[tuple[str, Path, Path]], params: Params) -> None:
        self.params = params
        self.sources = [(read_grey(a), read_grey(b)) for _, a, b in pairs]
        self.baseline = self._means([np.round((a + b) / 2) for a, b in self.sources])

    def _means(self, fused: list[np.ndarray]) -> dict[str, float]:
        values = [score_arrays(f, a, b, self.params.metrics)
                  for f, (a, b) in zip(fused, self.sources, strict=True)]
        return {k: float(np.mean([v[k] for v in values])) for k in metrics.ALL}

    def __call__(self, model: DAEFuse) -> tuple[float, dict[str, float]]:
        """(score, metric means) of ``model``; a model giving NaN scores ``FAILED``."""
        device = next(model.parameters()).device
        was_training = model.training
        model.eval()
        fused = []
        for a, b in self.sources:
            ta, tb = (torch.from_numpy(x / 255.0).float()[None, None].to(device) for x in (a, b))
            y = fuse_tensors(model, ta, tb).float().cpu().clamp(0, 1)[0, 0].numpy()
            fused.append(np.round(y * 255.0))
        model.train(was_training)
        means = self._means(fused)
        score = relative_score(means, self.baseline, self.params.search.score)
        return (score if math.isfinite(score) else FAILED), means
