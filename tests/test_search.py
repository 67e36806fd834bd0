"""Search pieces without Ray: the validation score, the search space, resuming a study.
(The search itself, 3 trials as Ray Train runs with MLflow child runs and a resumed study,
runs inside the retrain flow test: test_flows.py.)"""

import optuna
import pytest

from fusion.errors import FusionError
from fusion.params import MetricWeight, load_params
from fusion.validation import ValidationScore, held_out_pairs, relative_score


def test_relative_score_is_zero_for_the_baseline_and_flips_mse():
    base = {"VIF": 0.5, "MSE": 100.0}
    weights = [MetricWeight("VIF", 1.0), MetricWeight("MSE", 1.0)]
    assert relative_score(base, base, weights) == 0
    assert relative_score({"VIF": 0.6, "MSE": 90.0}, base, weights) == pytest.approx(0.15)


def test_search_space_must_name_loss_weights():
    with pytest.raises(FusionError, match="not a loss weight"):
        load_params(None, ["search.space=[{name: lr, low: 0.1, high: 1.0}]"])
    with pytest.raises(FusionError, match="low > 0"):
        load_params(None, ["search.space=[{name: lam, low: 0.0, high: 1.0, log: true}]"])


def test_a_resumed_study_counts_only_finished_trials(tmp_path):
    from fusion.search import _finished, redact

    url = f"sqlite:///{tmp_path / 'optuna.db'}"
    assert _finished(url, "s") == 0  # no study yet: everything to do
    study = optuna.create_study(study_name="s", storage=url, direction="maximize")
    study.optimize(lambda t: t.suggest_float("lam", 0, 1), n_trials=2)
    study.enqueue_trial({"lam": 0.5})
    failed = study.ask()
    study.tell(failed, state=optuna.trial.TrialState.FAIL)
    assert _finished(url, "s") == 2  # a failed trial is run again
    assert redact("postgresql://me:secret@db/optuna") == "postgresql://me:***@db/optuna"


def test_validation_scores_the_model_against_mean_fusion(tiny_run):
    from fusion.checkpoint import load_model

    pairs = held_out_pairs(tiny_run)
    assert pairs and all(a.exists() and b.exists() for _, a, b in pairs)
    scorer = ValidationScore(pairs, tiny_run)
    score, means = scorer(load_model(tiny_run.train.phase2_out))
    assert set(means) >= {"VIF", "Qabf", "SSIM"} and -1.0 < score < 1.0
