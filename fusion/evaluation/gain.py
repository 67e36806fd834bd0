"""Comparing metric means: per-metric means of many images, the relative gain of one
fusion over another, and their weighted score. One rule for the search's validation
score, the promotion gate and the promotion floor."""

from __future__ import annotations

import math

import numpy as np

from fusion.metric_names import GUARDED, LOWER_IS_BETTER


def means(values: list[dict[str, float]]) -> dict[str, float]:
    """Per-metric mean over images (the keys of the first image)."""
    if not values:
        return {}
    return {k: float(np.mean([v[k] for v in values])) for k in values[0]}


def relative_gain(ours: float, base: float, metric: str) -> float:
    """(ours - base) / |base|, sign flipped where lower is better (MSE)."""
    gain = (ours - base) / max(abs(base), 1e-12)
    return -gain if metric in LOWER_IS_BETTER else gain


def weighted_gain(ours: dict[str, float], base: dict[str, float], weights) -> float:
    """Weighted mean relative gain of ``ours`` over ``base`` (``weights``: MetricWeight
    list); NaN when a value is not finite."""
    total = weight_sum = 0.0
    for w in weights:
        total += w.weight * relative_gain(ours[w.metric], base[w.metric], w.metric)
        weight_sum += w.weight
    score = total / weight_sum if weight_sum else 0.0
    return score if math.isfinite(score) else math.nan


def guarded_gain(ours: dict[str, float], base: dict[str, float], weights,
                 guard: float) -> float:
    """``weighted_gain`` minus ``guard`` times each relative loss in the ``GUARDED``
    metrics: the weighted gain alone is won by copying a source (a 12-trial search study
    found +36 % that way at guard 1: docs/quality.md)."""
    lost = sum(max(0.0, -relative_gain(ours[m], base[m], m)) for m in GUARDED if m in base)
    return weighted_gain(ours, base, weights) - guard * lost


def standings(methods: dict[str, dict[str, float]], weights, names: tuple[str, ...],
              rule: str = "two-scale", floor: str = "mean") -> str:
    """Markdown table: each method's weighted gain over ``rule`` (the promotion gate's
    score, ``weights``) and how many of ``names`` it beats ``rule`` and ``floor`` on, the
    leaderboard's reading of one set's means."""
    lines = [f"| | gate vs {rule} | > {rule} | > {floor} |", "|---|---:|---:|---:|"]
    for label, values in methods.items():
        if label in (rule, floor):
            continue
        above = [sum(relative_gain(values[n], methods[base][n], n) > 0 for n in names)
                 for base in (rule, floor)]
        lines.append(f"| {label} | {100 * weighted_gain(values, methods[rule], weights):+.1f}%"
                     f" | {above[0]}/{len(names)} | {above[1]}/{len(names)} |")
    return "\n".join(lines)
