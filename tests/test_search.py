"""Search pieces without Ray: the validation score, the search space, resuming a study.
(The search itself, trials as Ray Train runs with MLflow child runs and a resumed study,
runs inside the retrain flow test: test_flows.py.)"""

from dataclasses import replace

import optuna
import pytest

from fusion.engine.exports import load_model
from fusion.errors import FusionError
from fusion.evaluation.gain import weighted_gain
from fusion.evaluation.validation import ValidationScore, held_out_pairs
from fusion.inference.fuse import TorchEngine
from fusion.inference.rules import TwoScaleEngine
from fusion.params import MetricWeight, load_params


def test_weighted_gain_is_zero_for_the_baseline_and_flips_mse():
    base = {"VIF": 0.5, "MSE": 100.0}
    weights = [MetricWeight("VIF", 1.0), MetricWeight("MSE", 1.0)]
    assert weighted_gain(base, base, weights) == 0
    assert weighted_gain({"VIF": 0.6, "MSE": 90.0}, base, weights) == pytest.approx(0.15)


def test_search_space_must_name_loss_weights():
    with pytest.raises(FusionError, match="not a loss weight"):
        load_params(None, ["model.dae-fuse.search=[{name: phase1.lr, low: 0.1, high: 1.0}]"])
    with pytest.raises(FusionError, match="low > 0"):
        load_params(None, ["model.dae-fuse.search=[{name: phase1.lam, low: 0.0, high: 1.0, "
                           "log: true}]"])


@pytest.mark.parametrize("backend", ["sqlite", "postgres"])
def test_a_resumed_study_counts_only_finished_trials(backend, tmp_path, request):
    """On the default SQLite file and on a real PostgreSQL server (a team's study)."""
    from fusion.mlops.search import _finished, redact

    url = (f"sqlite:///{tmp_path / 'optuna.db'}" if backend == "sqlite"
           else request.getfixturevalue("postgres").database("optuna_resume"))
    assert _finished(url, "s") == 0  # no study yet: everything to do
    study = optuna.create_study(study_name="s", storage=url, direction="maximize")
    study.optimize(lambda t: t.suggest_float("lam", 0, 1), n_trials=2)
    study.enqueue_trial({"lam": 0.5})
    failed = study.ask()
    study.tell(failed, state=optuna.trial.TrialState.FAIL)
    assert _finished(url, "s") == 2  # a failed trial is run again
    assert redact("postgresql://me:secret@db/optuna") == "postgresql://me:***@db/optuna"


def test_trial_weights_land_in_the_active_family(tiny_runs):
    from fusion.mlops.search import _nested, trial_params

    params = tiny_runs["cddfuse"]
    space = [r.name for r in params.config.search]
    assert {"phase2.w_decomp", "phase2.guard"} <= set(space)
    sampled = {name: 0.25 * (i + 1) for i, name in enumerate(space)}
    trial = trial_params(params, sampled)
    assert trial.config.phase2.w_decomp == sampled["phase2.w_decomp"]
    assert trial.config.phase2.guard == sampled["phase2.guard"]
    assert trial.config.phase1.w_decomp == params.config.phase1.w_decomp  # untouched
    assert trial.config.phase1.w_ssim == params.config.phase1.w_ssim
    assert trial.train.steps == params.search.steps
    assert _nested({"phase2.w_int": 3.0}) == {"phase2": {"w_int": 3.0}}


def test_validation_scores_against_the_baseline(tiny_run):
    """The tiny model scores below the search's baseline (a negative gain); the baseline
    itself (the two-scale rule), fed back as a 'model', scores zero, and mean fusion below
    it."""
    pairs = held_out_pairs(tiny_run)
    assert pairs and all(a.shape == b.shape and a.ndim == 2 for _, a, b in pairs)
    assert tiny_run.search.baseline == "two-scale"
    scorer = ValidationScore(pairs, tiny_run)
    model = load_model(tiny_run.train.phase_out(2))
    score, means = scorer(TorchEngine(model, tiny_run.family))
    assert set(means) >= {"VIF", "Qabf", "SSIM"} and score < 0
    assert scorer(TwoScaleEngine(tiny_run.evaluate.two_scale))[0] == pytest.approx(0.0,
                                                                                   abs=1e-12)

    def mean_fusion(a, b):
        return (a + b) / 2
    mean_fusion.explains = False
    assert scorer(mean_fusion)[0] < 0


def test_the_validation_score_charges_for_what_copying_a_source_gives_up(tiny_run):
    """Copying source A games the weighted gain (VIF and MI reward it); the search's score
    subtracts ``search.guard`` times each relative loss in SD, SF, SCD or SSIM against the
    baseline, computed here by hand from the metric means."""
    pairs = held_out_pairs(tiny_run)

    def copy_a(a, b):
        return a
    copy_a.explains = False
    unguarded = ValidationScore(pairs, replace(tiny_run, search=replace(tiny_run.search,
                                                                        guard=0.0)))
    raw, means = unguarded(copy_a)
    score, _ = ValidationScore(pairs, tiny_run)(copy_a)
    base = unguarded.baseline
    lost = sum(max(0.0, (base[m] - means[m]) / abs(base[m])) for m in ("SD", "SF", "SCD", "SSIM"))
    assert lost > 0.05 and tiny_run.search.guard == 4.0
    assert score == pytest.approx(raw - 4.0 * lost, rel=1e-9)
    assert score < raw - 0.2
