"""The MLflow runs of a pipeline execution: one parent run ``pipeline`` keyed by the
training fingerprint, and the child runs each training phase logs its steps to live.

The first stage that needs the parent run (the retrain flow, else the first ``fusion
train``) opens it; each training phase logs to a child run ``train_phase<N>`` while it
trains (rank 0 of the Ray workers; a restarted worker group continues the same run);
``register`` adds the evaluation and the model and closes it.
"""

from __future__ import annotations

import os
from dataclasses import dataclass

from fusion.mlops.connection import answering, connect
from fusion.mlops.provenance import git_commit
from fusion.params import Params

PIPELINE = "fusion.pipeline"  # parent-run tag: the fingerprint of its execution
TRAIN_RUN = "fusion.train_run"  # child-run tag: the Ray/local training run name


def experiment_id(params: Params) -> str:
    import mlflow

    return mlflow.set_experiment(params.mlflow.experiment).experiment_id


def find_run(experiment: str, filters: str) -> str | None:
    from mlflow import MlflowClient

    runs = MlflowClient().search_runs([experiment], filters, max_results=1,
                                      order_by=["attributes.start_time DESC"])
    return runs[0].info.run_id if runs else None


def pipeline_run(params: Params, fingerprint: str) -> str:
    """The open parent run of this pipeline execution, created when there is none."""
    from mlflow import MlflowClient

    experiment = experiment_id(params)
    found = find_run(experiment, f"tags.`{PIPELINE}` = '{fingerprint}' and "
                                  "attributes.status = 'RUNNING'")
    if found:
        return found
    run = MlflowClient().create_run(experiment, run_name="pipeline",
                                    tags={PIPELINE: fingerprint, "git_commit": git_commit()})
    return run.info.run_id


@dataclass(frozen=True)
class MlflowSink:
    """Where a training phase logs its steps live: an MLflow run, from any process (it is
    pickled to the Ray workers; rank 0 logs). Restarted workers continue the same run."""

    uri: str
    run_id: str
    timeout_s: float = 30.0

    def open(self) -> None:
        """Make the run active in this process, with system metrics (CPU, memory)."""
        import logging

        import mlflow

        logging.getLogger("mlflow.system_metrics").setLevel(logging.WARNING)
        os.environ.setdefault("MLFLOW_HTTP_REQUEST_TIMEOUT", str(int(self.timeout_s)))
        mlflow.set_tracking_uri(self.uri)
        mlflow.start_run(run_id=self.run_id, log_system_metrics=True)

    def log(self, step: int, metrics: dict[str, float]) -> None:
        import mlflow

        mlflow.log_metrics({k: float(v) for k, v in metrics.items()}, step=step)

    def close(self) -> None:
        import mlflow

        if mlflow.active_run() is not None:
            mlflow.end_run()


def phase_sink(params: Params, phase: int, name: str, fingerprint: str) -> MlflowSink:
    """The child run ``train_phase<N>`` of this pipeline execution for training run
    ``name`` (found again after a crash, so a rerun continues it)."""
    from mlflow import MlflowClient

    uri = connect(params.mlflow)
    with answering(uri):
        parent = pipeline_run(params, fingerprint)
        experiment = experiment_id(params)
        found = find_run(experiment, f"tags.`{TRAIN_RUN}` = '{name}' and "
                                      f"tags.`mlflow.parentRunId` = '{parent}'")
        if found is None:
            client = MlflowClient()
            found = client.create_run(experiment, run_name=f"train_phase{phase}", tags={
                TRAIN_RUN: name, "mlflow.parentRunId": parent}).info.run_id
            client.log_param(found, "run", name)
    return MlflowSink(uri, found, params.mlflow.timeout_s)


def child_run(parent: str, experiment: str, name: str) -> str:
    """A nested run of the parent by name, created once (reruns reuse it)."""
    from mlflow import MlflowClient

    found = find_run(experiment, f"tags.`mlflow.parentRunId` = '{parent}' and "
                                  f"attributes.run_name = '{name}'")
    if found:
        return found
    return MlflowClient().create_run(experiment, run_name=name,
                                     tags={"mlflow.parentRunId": parent}).info.run_id
