"""``fusion search``: Optuna through Ray Tune over the loss weights (``search`` in params).

Each Tune trial is a driver that starts one Ray Train run (Train V2 with Tune): every DDP
worker trains phase I and then phase II with the trial's weights, using the same
``Trainer`` loop as ``fusion train``, and rank 0 reports the validation score on the
held-out pairs every ``search.eval_every`` phase II steps. ASHA stops weak trials at those
milestones. The Optuna study lives in an RDB (SQLite by default), so rerunning with the
same study name resumes it: only the trials the study still lacks are run, and the sampler
sees every earlier trial. Trials are logged as MLflow child runs of one ``search`` run;
the best weights go to ``search.out/best.json`` and into ``search.write_params`` (the
``loss`` section of params.yaml), where ``dvc repro`` and the retrain flow pick them up.
"""

from __future__ import annotations

import csv
import json
import os
import re
import sys
import time
from dataclasses import asdict, replace
from pathlib import Path
from typing import Any

os.environ.setdefault("RAY_ENABLE_UV_RUN_RUNTIME_ENV", "0")  # see fusion/distributed.py

import optuna  # noqa: E402
import ray  # noqa: E402
import ray.train  # noqa: E402
import ray.train.torch  # noqa: E402
import torch  # noqa: E402
from ray import tune  # noqa: E402
from ray.air.integrations.mlflow import MLflowLoggerCallback  # noqa: E402
from ray.train import FailureConfig, RunConfig  # noqa: E402
from ray.tune.integration.ray_train import TuneReportCallback  # noqa: E402
from ray.tune.schedulers import ASHAScheduler  # noqa: E402
from ray.tune.search.optuna import OptunaSearch  # noqa: E402

from fusion.data import PatchStream  # noqa: E402
from fusion.distributed import connect, scaling, shipped, storage  # noqa: E402
from fusion.errors import FusionError  # noqa: E402
from fusion.params import Params, update_params_file  # noqa: E402
from fusion.train import Hooks, Trainer  # noqa: E402
from fusion.validation import ValidationScore, held_out_pairs  # noqa: E402

FINISHED = (optuna.trial.TrialState.COMPLETE, optuna.trial.TrialState.PRUNED)


def storage_url(params: Params) -> str:
    return params.search.storage or f"sqlite:///{Path(params.search.out).resolve()}/optuna.db"


def redact(url: str) -> str:
    """A storage URL without its password, for logs and reports."""
    return re.sub(r"//([^:/@]+):[^@]*@", r"//\1:***@", url)


def trial_params(base: Params, config: dict[str, Any]) -> Params:
    """The params of one trial: the sampled loss weights and the search's step counts."""
    s = base.search
    loss = replace(base.loss, **{r.name: float(config[r.name]) for r in s.space})
    train = replace(base.train, phase1_steps=s.phase1_steps, phase2_steps=s.phase2_steps,
                    checkpoint_every=s.phase1_steps + s.phase2_steps)
    return replace(base, loss=loss, train=train)


def _trial_worker(config: dict[str, Any]) -> None:
    """One DDP worker of a trial: phase I, then phase II with validation reports."""
    params: Params = config["params"]
    torch.set_num_threads(max(1, int(params.ray.cpus_per_worker)))
    ctx = ray.train.get_context()
    rank, world = ctx.get_world_rank(), ctx.get_world_size()
    device = ray.train.torch.get_device()
    t = params.train
    stream = PatchStream(Path(t.data) / "patches", "train", t.batch_size, t.seed,
                         rank=rank, world=world, crop=t.crop)
    first = Trainer(params, 1, device, wrap=ray.train.torch.prepare_model)
    first.fit(stream.batch)
    weights = ({k: v.cpu() for k, v in first.model.state_dict().items()},
               {k: v.cpu() for k, v in first.disc.state_dict().items()})
    second = Trainer(params, 2, device, init=weights, wrap=ray.train.torch.prepare_model)
    scorer = ValidationScore(config["val"], params) if rank == 0 else None
    every = params.search.eval_every
    while second.step < second.steps:
        second.fit(stream.batch, Hooks(), until=second.step + every)
        if scorer is None:
            ray.train.report({"step": second.step})
            continue
        score, means = scorer(second.model)
        print(f"trial step {second.step}/{second.steps}: score {score:+.4f}", file=sys.stderr,
              flush=True)
        ray.train.report({"step": second.step, "score": score,
                          **{f"val_{k}": v for k, v in means.items()}})


def _trial(config: dict[str, Any], base: Params, val: list) -> None:
    """A Tune trial: one Ray Train run (Train V2 pattern), its reports forwarded to Tune."""
    params = trial_params(base, config)
    root, fs = storage(base)
    trial_id = tune.get_context().get_trial_id()
    trainer = ray.train.torch.TorchTrainer(
        _trial_worker, train_loop_config={"params": params, "val": val},
        scaling_config=scaling(params),
        run_config=RunConfig(name=f"search-{base.search.study}-{trial_id}", storage_path=root,
                             storage_filesystem=fs, callbacks=[TuneReportCallback()],
                             failure_config=FailureConfig(max_failures=base.ray.max_failures)))
    trainer.fit()


def _space(params: Params) -> dict[str, Any]:
    return {r.name: (tune.loguniform if r.log else tune.uniform)(r.low, r.high)
            for r in params.search.space}


def _finished(url: str, study: str) -> int:
    try:
        loaded = optuna.load_study(study_name=study, storage=optuna.storages.RDBStorage(url))
    except KeyError:  # no such study yet
        return 0
    return sum(t.state in FINISHED for t in loaded.trials)


def _write_trials(study: optuna.Study, path: Path) -> None:
    names = sorted({k for t in study.trials for k in t.params})
    with path.open("w", newline="") as fh:
        writer = csv.writer(fh)
        writer.writerow(["number", "state", "score", *names])
        for t in study.trials:
            writer.writerow([t.number, t.state.name, t.value, *(t.params.get(n) for n in names)])


def run_search(params: Params, trials: int | None = None, study: str | None = None,
               address: str = "", write_params: str | None = None) -> dict[str, Any]:
    """Run (or resume) the study until it holds ``trials`` finished trials; returns best.json."""
    from fusion.tracking import connect as mlflow_connect

    s = params.search
    trials = trials or s.trials
    study = study or s.study
    write_params = s.write_params if write_params is None else write_params
    out = Path(s.out)
    out.mkdir(parents=True, exist_ok=True)
    url = storage_url(params)
    val = held_out_pairs(params)
    done = _finished(url, study)
    todo = max(0, trials - done)
    print(f"search {study} ({redact(url)}): {done} trial(s) done, running {todo} more on "
          f"{len(val)} held-out pair(s)", file=sys.stderr, flush=True)
    import mlflow

    uri = mlflow_connect(params.mlflow.tracking_uri)
    mlflow.set_experiment(params.mlflow.experiment)
    with mlflow.start_run(run_name=f"search-{study}",
                          tags={"fusion.search.study": study}) as parent:
        mlflow.log_params({"study": study, "storage": redact(url), "trials_before": done,
                           "trials_target": trials, **{f"space.{r.name}": f"[{r.low}, {r.high}]"
                                                       f"{' log' if r.log else ''}"
                                                       for r in s.space}})
        if todo:
            _tune(params, study, url, todo, val, uri, parent.info.run_id, address)
        result = _best(params, study, url, out, done, todo)
        result["mlflow_run_id"] = parent.info.run_id
        mlflow.log_metric("best_score", result["score"])
        mlflow.log_artifact(str(out / "best.json"))
        mlflow.log_artifact(str(out / "trials.csv"))
    if write_params:
        update_params_file(write_params, {"loss": result["best"]})
        print(f"search {study}: best loss weights written to {write_params}", file=sys.stderr)
    return result


def _tune(params: Params, study: str, url: str, todo: int, val: list, uri: str,
          parent: str, address: str) -> None:
    s = params.search
    connect(address or params.ray.address)
    root, fs = storage(params)
    searcher = OptunaSearch(storage=optuna.storages.RDBStorage(url), study_name=study)
    scheduler = ASHAScheduler(time_attr="step", max_t=s.phase2_steps, grace_period=s.eval_every,
                              reduction_factor=s.reduction_factor)
    mlflow_log = MLflowLoggerCallback(tracking_uri=uri, experiment_name=params.mlflow.experiment,
                                      tags={"mlflow.parentRunId": parent,
                                            "fusion.search.study": study},
                                      save_artifact=False)
    trainable = tune.with_parameters(_trial, base=shipped(params), val=val)
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
    loaded = optuna.load_study(study_name=study, storage=optuna.storages.RDBStorage(url))
    _write_trials(loaded, out / "trials.csv")
    finished = [t for t in loaded.trials if t.state in FINISHED and t.value is not None]
    if not finished:
        raise FusionError(f"search {study}: no finished trial to take weights from")
    best = max(finished, key=lambda t: t.value)
    weights = {**asdict(params.loss), **{k: float(v) for k, v in best.params.items()}}
    result = {"study": study, "storage": redact(url), "trials": len(finished),
              "trials_before": done, "trials_run": todo, "best_trial": best.number,
              "score": float(best.value), "best": weights}
    (out / "best.json").write_text(json.dumps(result, indent=2) + "\n")
    return result
