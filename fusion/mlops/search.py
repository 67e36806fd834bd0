"""``fusion search``: Optuna through Ray Tune over the active family's loss weights
(``model.<family>.search``; settings in ``search``).

Each Tune trial is a driver that starts one Ray Train run (Train V2 with Tune): every DDP
worker trains the family's phases in turn with the trial's weights (only the warm phases
when ``train.init`` names a trained model), using the same ``Trainer`` loop as ``fusion
train``, and rank 0 reports the validation score on the held-out pairs every
``search.eval_every`` steps of the last phase. ASHA stops weak trials at those
milestones. The Optuna study lives in an RDB (SQLite by default), so rerunning with the
same study name resumes it: only the trials the study still lacks are run, and the sampler
sees every earlier trial. Trials are logged as MLflow child runs of one ``search`` run;
the best weights go to ``search.out/best.json`` and into ``search.write_params`` (the
family's section of params.yaml), where ``dvc repro`` and the retrain flow pick them up.
"""

from __future__ import annotations

import copy
import csv
import json
import os
import re
import sys
import time
from dataclasses import replace
from pathlib import Path
from typing import Any

from fusion.engine.cluster import connect, shipped, storage, torch_trainer, worker_start
from fusion.engine.start import NO_START, Start, phase_weights
from fusion.errors import FusionError
from fusion.params import ModelParams, Params, update_params_file

FINISHED_STATES = ("COMPLETE", "PRUNED")


def study_name(params: Params, study: str | None = None) -> str:
    return study or params.search.study or f"{params.model.family}-loss"


def storage_url(params: Params) -> str:
    """search.storage, else $OPTUNA_STORAGE (a database URL with a password stays out of
    params.yaml), else SQLite beside the search reports."""
    return (params.search.storage or os.environ.get("OPTUNA_STORAGE", "")
            or f"sqlite:///{Path(params.search.out).resolve()}/optuna.db")


def redact(url: str) -> str:
    """A storage URL without its password, for logs and reports."""
    return re.sub(r"//([^:/@]+):[^@]*@", r"//\1:***@", url)


def with_weights(params: Params, weights: dict[str, float]) -> Params:
    """Params whose active family has these loss weights (``phase<N>.<weight>`` keys)."""
    config = params.config
    for key, value in weights.items():
        section, weight = key.split(".", 1)
        config = replace(config, **{section: replace(getattr(config, section),
                                                     **{weight: float(value)})})
    configs = {**params.model.configs, params.model.family: config}
    return replace(params, model=ModelParams(params.model.family, configs))


def trial_params(base: Params, config: dict[str, Any]) -> Params:
    """The params of one trial: the sampled loss weights and the search's step counts."""
    s = base.search
    params = with_weights(base, {r.name: config[r.name] for r in base.config.search})
    train = replace(base.train, steps=list(s.steps), checkpoint_every=sum(s.steps) + 1)
    return replace(params, train=train)


def _trial_worker(config: dict[str, Any]) -> None:
    """One DDP worker of a trial: every phase the recipe runs (the warm phases when the
    search starts from a trained model), the last reporting validation scores."""
    import ray.train
    import ray.train.torch

    from fusion.engine.trainer import Hooks, Trainer
    from fusion.evaluation.validation import ValidationScore
    from fusion.inference.fuse import TorchEngine

    params, rank, world, device, stream = worker_start(config)
    start: Start = config["start"]
    phases = [n for n in range(1, len(params.family.phases) + 1)
              if params.family.runs_phase(n, start.warm)]
    weights = config["init"]
    for phase in phases[:-1]:
        trainer = Trainer(params, phase, device, init=weights, wrap=ray.train.torch.prepare_model)
        trainer.fit(stream.batch)
        weights = trainer.weights_cpu()
    last = Trainer(params, phases[-1], device, init=weights, wrap=ray.train.torch.prepare_model)
    scorer = ValidationScore(config["val"], params) if rank == 0 else None
    every = params.search.eval_every
    while last.step < last.steps:
        last.fit(stream.batch, Hooks(), until=last.step + every)
        if scorer is None:
            ray.train.report({"step": last.step})
            continue
        snapshot = copy.deepcopy(last.model).eval()  # the engine converts its model in place
        score, means = scorer(TorchEngine(snapshot, params.family, device=device))
        print(f"trial step {last.step}/{last.steps}: score {score:+.4f}", file=sys.stderr,
              flush=True)
        ray.train.report({"step": last.step, "score": score,
                          **{f"val_{k}": v for k, v in means.items()}})


def _trial(config: dict[str, Any], base: Params, val: list, start: Start, init: Any) -> None:
    """A Tune trial: one Ray Train run (Train V2 pattern), its reports forwarded to Tune."""
    from ray import tune
    from ray.tune.integration.ray_train import TuneReportCallback

    root, fs = storage(base)
    trial_id = tune.get_context().get_trial_id()
    trainer = torch_trainer(_trial_worker, trial_params(base, config),
                            {"val": val, "start": start, "init": init},
                            f"search-{study_name(base)}-{trial_id}", root, fs,
                            callbacks=[TuneReportCallback()])
    trainer.fit()


def _space(params: Params) -> dict[str, Any]:
    from ray import tune

    return {r.name: (tune.loguniform if r.log else tune.uniform)(r.low, r.high)
            for r in params.config.search}


def _load(url: str, study: str):
    import optuna

    try:
        return optuna.load_study(study_name=study, storage=optuna.storages.RDBStorage(url))
    except KeyError:  # no such study yet
        return None


def _finished(url: str, study: str) -> int:
    loaded = _load(url, study)
    return 0 if loaded is None else sum(t.state.name in FINISHED_STATES for t in loaded.trials)


def _write_trials(study: Any, path: Path) -> None:
    names = sorted({k for t in study.trials for k in t.params})
    with path.open("w", newline="") as fh:
        writer = csv.writer(fh)
        writer.writerow(["number", "state", "score", *names])
        for t in study.trials:
            writer.writerow([t.number, t.state.name, t.value, *(t.params.get(n) for n in names)])


def run_search(params: Params, trials: int | None = None, study: str | None = None,
               address: str = "", write_params: str | None = None,
               start: Start = NO_START) -> dict[str, Any]:
    """Run (or resume) the study until it holds ``trials`` finished trials; returns best.json."""
    import mlflow

    from fusion.evaluation.validation import held_out_pairs
    from fusion.mlops.connection import answering
    from fusion.mlops.connection import connect as mlflow_connect

    s = params.search
    trials = trials or s.trials
    study = study_name(params, study)
    write_params = s.write_params if write_params is None else write_params
    out = Path(s.out)
    out.mkdir(parents=True, exist_ok=True)
    url = storage_url(params)
    val = held_out_pairs(params)
    done = _finished(url, study)
    todo = max(0, trials - done)
    print(f"search {study} ({redact(url)}): {done} trial(s) done, running {todo} more on "
          f"{len(val)} held-out pair(s)", file=sys.stderr, flush=True)
    uri = mlflow_connect(params.mlflow)
    with answering(uri):
        mlflow.set_experiment(params.mlflow.experiment)
        with mlflow.start_run(run_name=f"search-{study}",
                              tags={"fusion.search.study": study}) as parent:
            mlflow.log_params({"study": study, "storage": redact(url), "trials_before": done,
                               "trials_target": trials, "family": params.model.family,
                               "init": start.source or "scratch",
                               **{f"space.{r.name}": f"[{r.low}, {r.high}]"
                                  f"{' log' if r.log else ''}" for r in params.config.search}})
            if todo:
                _tune(params, study, url, todo, val, uri, parent.info.run_id, address, start,
                      first=done == 0)
            result = _best(params, study, url, out, done, todo)
            result["mlflow_run_id"] = parent.info.run_id
            mlflow.log_metric("best_score", result["score"])
            mlflow.log_artifact(str(out / "best.json"))
            mlflow.log_artifact(str(out / "trials.csv"))
    if write_params:
        update_params_file(write_params, {"model": {params.model.family: _nested(
            result["best"])}})
        print(f"search {study}: best loss weights written to {write_params}", file=sys.stderr)
    return result


def _nested(weights: dict[str, float]) -> dict[str, dict[str, float]]:
    """{"phase2.w_text": 3.0} -> {"phase2": {"w_text": 3.0}} (a params.yaml update)."""
    out: dict[str, dict[str, float]] = {}
    for key, value in weights.items():
        section, weight = key.split(".", 1)
        out.setdefault(section, {})[weight] = value
    return out


def current_weights(params: Params) -> dict[str, float]:
    """The active family's weights the search space names, as params.yaml has them."""
    return {r.name: getattr(getattr(params.config, r.name.split(".")[0]), r.name.split(".")[1])
            for r in params.config.search}


def _tune(params: Params, study: str, url: str, todo: int, val: list, uri: str,
          parent: str, address: str, start: Start, first: bool = False) -> None:
    s = params.search
    connect(address or params.ray.address)  # first: it sets the environment Ray reads on import
    import optuna
    from ray import tune
    from ray.air.integrations.mlflow import MLflowLoggerCallback
    from ray.tune.schedulers import ASHAScheduler
    from ray.tune.search.optuna import OptunaSearch

    root, fs = storage(params)
    phases = [n for n in range(1, len(params.family.phases) + 1)
              if params.family.runs_phase(n, start.warm)]
    # a new study's first trial is the current recipe: the study then says whether its
    # space holds better weights, not only which of its samples is best
    searcher = OptunaSearch(storage=optuna.storages.RDBStorage(url), study_name=study,
                            points_to_evaluate=[current_weights(params)] if first else None)
    scheduler = ASHAScheduler(time_attr="step", max_t=s.steps[phases[-1] - 1],
                              grace_period=s.eval_every, reduction_factor=s.reduction_factor)
    mlflow_log = MLflowLoggerCallback(tracking_uri=uri, experiment_name=params.mlflow.experiment,
                                      tags={"mlflow.parentRunId": parent,
                                            "fusion.search.study": study},
                                      save_artifact=False)
    init = phase_weights(params, 1, start)  # a warm start's skipped phases pass it on
    trainable = tune.with_parameters(_trial, base=shipped(params), val=val, start=start,
                                     init=init)
    tuner = tune.Tuner(
        # the driver only waits (no CPU); Ray needs some resource in its bundle: a little memory
        tune.with_resources(trainable, {"cpu": 0, "memory": 64 * 2**20}),
        param_space=_space(params),
        tune_config=tune.TuneConfig(metric="score", mode="max", search_alg=searcher,
                                    scheduler=scheduler, num_samples=todo,
                                    max_concurrent_trials=s.max_concurrent,
                                    trial_name_creator=lambda t: f"trial-{t.trial_id}"),
        run_config=tune.RunConfig(name=f"search-{study}-{time.strftime('%Y%m%d-%H%M%S')}",
                                  storage_path=root, storage_filesystem=fs,
                                  callbacks=[mlflow_log], verbose=1))
    grid = tuner.fit()
    errors = [r.error for r in grid if r.error is not None]
    if errors and len(errors) == len(grid):
        raise FusionError(f"search {study}: every trial failed; first error: {errors[0]}")


def _best(params: Params, study: str, url: str, out: Path, done: int,
          todo: int) -> dict[str, Any]:
    from fusion.files import write_text

    loaded = _load(url, study)
    _write_trials(loaded, out / "trials.csv")
    finished = [t for t in loaded.trials if t.state.name in FINISHED_STATES
                and t.value is not None]
    if not finished:
        raise FusionError(f"search {study}: no finished trial to take weights from")
    best = max(finished, key=lambda t: t.value)
    current = current_weights(params)
    weights = {**current, **{k: float(v) for k, v in best.params.items()}}
    result = {"study": study, "family": params.model.family, "storage": redact(url),
              "trials": len(finished), "trials_before": done, "trials_run": todo,
              "best_trial": best.number, "score": float(best.value), "best": weights}
    write_text(out / "best.json", json.dumps(result, indent=2) + "\n")
    return result
