"""The promotion rule alone (pure logic, no registry)."""

import math

from fusion.evaluation.gain import standings
from fusion.mlops.promotion import decide, floor
from fusion.params import MetricWeight, PromoteParams

RULE = PromoteParams(weights=[MetricWeight("VIF", 1.0), MetricWeight("MSE", 1.0)],
                     min_improvement=0.01, max_drop=0.05)
CHAMP = {"tno": {"VIF": 0.5, "MSE": 100.0}, "mri": {"VIF": 0.4, "MSE": 50.0}}


def test_weighted_gain_promotes_and_mse_counts_lower_as_better():
    better = {"tno": {"VIF": 0.55, "MSE": 90.0}, "mri": {"VIF": 0.42, "MSE": 50.0}}
    d = decide(better, CHAMP, RULE)
    assert d.promote
    assert math.isclose(d.gains["tno"]["MSE"], 0.1)
    assert math.isclose(d.score, (0.1 + 0.1 + 0.05 + 0.0) / 4)


def test_too_small_gain_is_rejected():
    d = decide({"tno": {"VIF": 0.501, "MSE": 100.0}, "mri": {"VIF": 0.4, "MSE": 50.0}},
               CHAMP, RULE)
    assert not d.promote and "below the required" in d.reason


def test_guard_rejects_a_large_drop_on_one_set_despite_a_large_mean_gain():
    d = decide({"tno": {"VIF": 0.9, "MSE": 10.0}, "mri": {"VIF": 0.3, "MSE": 50.0}},
               CHAMP, RULE)
    assert d.score > 0.1 and not d.promote and "VIF on mri drops 25.0%" in d.reason


def test_non_finite_metrics_are_rejected():
    d = decide({"tno": {"VIF": float("nan"), "MSE": 1.0}, "mri": CHAMP["mri"]}, CHAMP, RULE)
    assert not d.promote and "not finite" in d.reason


def test_the_floor_needs_a_positive_gain_over_the_baseline_on_every_set():
    rule = PromoteParams(weights=[MetricWeight("VIF", 1.0), MetricWeight("MSE", 1.0)])
    baseline = {"tno": {"VIF": 0.5, "MSE": 100.0}, "mri": {"VIF": 0.4, "MSE": 50.0}}
    above = {"tno": {"VIF": 0.6, "MSE": 90.0}, "mri": {"VIF": 0.41, "MSE": 50.0}}
    assert floor(above, baseline, rule) is None
    below_on_one = {"tno": {"VIF": 0.9, "MSE": 10.0}, "mri": {"VIF": 0.4, "MSE": 51.0}}
    d = floor(below_on_one, baseline, rule)
    assert not d.promote and d.reason.startswith("below two-scale fusion on mri: weighted gain "
                                                  "-1.00%")
    assert floor(baseline, baseline, rule) is not None  # as good as the baseline is not enough
    nan = {"tno": {"VIF": float("nan"), "MSE": 1.0}, "mri": above["mri"]}
    assert not floor(nan, baseline, rule).promote


def test_standings_count_the_metrics_above_the_rule_and_mean_fusion_and_the_gate_score():
    """The leaderboard's reading of a set: the gate's weighted gain over the two-scale rule
    and the metrics above it and above mean fusion (MSE counts lower as better)."""
    rule = {"VIF": 0.5, "SSIM": 1.0, "MSE": 10.0}
    methods = {"model": {"VIF": 0.6, "SSIM": 0.9, "MSE": 8.0}, "two-scale": rule,
               "mean": {"VIF": 0.7, "SSIM": 0.8, "MSE": 9.0}}
    table = standings(methods, [MetricWeight("VIF"), MetricWeight("SSIM")],
                      ("VIF", "SSIM", "MSE"))
    # gate: (+20% VIF - 10% SSIM) / 2 = +5%; above the rule on VIF and MSE, above mean on
    # SSIM and MSE
    assert table.splitlines()[2:] == ["| model | +5.0% | 2/3 | 2/3 |"]
