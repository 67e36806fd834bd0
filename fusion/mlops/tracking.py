"""MLflow side of the pipeline: one parent run per pipeline execution, live training curves,
and a registry entry per trained model.

- The tracking URI is resolved one way for every command: ``mlflow.tracking_uri``
  (params.yaml or ``--set``), else ``$MLFLOW_TRACKING_URI``, else ``sqlite:///mlflow.db``.
  Requests to a server time out and are retried a bounded number of times
  (``mlflow.timeout_s``, ``mlflow.retries``); a server that does not answer is exit 75,
  naming its URI.
- The parent run ``pipeline`` is keyed by the training fingerprint (data, params, starting
  weights). The first stage that needs it (the retrain flow, else the first ``fusion
  train``) opens it; each training phase logs its steps to a child run
  ``train_phase<N>`` while it trains (rank 0 of the Ray workers, a restarted worker group
  continues the same run); ``register`` adds the evaluation and the model and closes it.
- ``register`` is resumable: the version it creates carries a registration key (model
  weights and evaluation); a rerun after any failure finds that version instead of
  creating another, then sets ``challenger``. ``registered.json`` is removed first and
  written last, so it is never stale.
"""

from __future__ import annotations

import hashlib
import json
import os
import subprocess
import tempfile
import urllib.error
import urllib.request
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from fusion import chaos
from fusion.errors import FusionError, TransientError
from fusion.params import MlflowParams, Params, to_dict

DEFAULT_URI = "sqlite:///mlflow.db"
FINGERPRINT = "training_fingerprint"  # tag: data + params the version was trained from
PIPELINE = "fusion.pipeline"  # parent-run tag: the fingerprint of its execution
TRAIN_RUN = "fusion.train_run"  # child-run tag: the Ray/local training run name
REGISTRATION = "fusion.registration"  # version tag: weights + evaluation it registers
LINEAGE = "lineage.init"  # version tag: the warm start the weights descend from
CHALLENGER, CHAMPION = "challenger", "champion"


def tracking_uri(configured: str) -> str:
    """``--set``/params.yaml, else ``$MLFLOW_TRACKING_URI``, else the SQLite default; a
    relative SQLite path is made absolute (Ray workers log from other folders)."""
    uri = configured or os.environ.get("MLFLOW_TRACKING_URI", "") or DEFAULT_URI
    if uri.startswith("sqlite:///") and not uri.startswith("sqlite:////"):
        uri = f"sqlite:///{Path(uri.removeprefix('sqlite:///')).resolve()}"
    return uri


def connect(ml: MlflowParams) -> str:
    """Point MLflow at the configured store with bounded request waits; a server that does
    not answer is a TransientError naming its URI (MLflow alone would retry for minutes)."""
    uri = tracking_uri(ml.tracking_uri)
    os.environ.setdefault("MLFLOW_HTTP_REQUEST_TIMEOUT", str(int(ml.timeout_s)))
    os.environ.setdefault("MLFLOW_HTTP_REQUEST_MAX_RETRIES", str(ml.retries))
    os.environ.setdefault("MLFLOW_HTTP_REQUEST_BACKOFF_FACTOR", "1")
    if uri.startswith(("http://", "https://")):
        try:
            with urllib.request.urlopen(f"{uri.rstrip('/')}/health",
                                        timeout=ml.timeout_s) as reply:
                reply.read()
        except (urllib.error.URLError, OSError) as exc:
            raise TransientError(f"MLflow tracking server {uri} is unreachable: {exc}") from exc
    import mlflow

    # MLflow also exports the URI as $MLFLOW_TRACKING_URI for child processes; that variable
    # is the user's setting (it ranks after params.yaml), so it is put back as it was
    before = os.environ.get("MLFLOW_TRACKING_URI")
    mlflow.set_tracking_uri(uri)
    mlflow.set_registry_uri(uri)
    if before is None:
        os.environ.pop("MLFLOW_TRACKING_URI", None)
    else:
        os.environ["MLFLOW_TRACKING_URI"] = before
    return uri


@contextmanager
def answering(uri: str) -> Iterator[None]:
    """Turn a tracking server that stops answering mid-command into a TransientError."""
    import requests
    from mlflow.exceptions import MlflowException

    try:
        yield
    except requests.exceptions.RequestException as exc:
        raise TransientError(f"MLflow tracking server {uri} stopped answering: "
                             f"{type(exc).__name__}") from exc
    except MlflowException as exc:
        text = str(exc)
        if any(s in text for s in ("Max retries exceeded", "Connection", "timed out",
                                   "API request to", "status code 5")):
            raise TransientError(f"MLflow tracking server {uri} stopped answering: "
                                 f"{text.splitlines()[0][:200]}") from exc
        raise


def _experiment(params: Params) -> str:
    import mlflow

    return mlflow.set_experiment(params.mlflow.experiment).experiment_id


def _find_run(experiment: str, filters: str) -> str | None:
    from mlflow import MlflowClient

    runs = MlflowClient().search_runs([experiment], filters, max_results=1,
                                      order_by=["attributes.start_time DESC"])
    return runs[0].info.run_id if runs else None


def pipeline_run(params: Params, fingerprint: str) -> str:
    """The open parent run of this pipeline execution, created when there is none."""
    from mlflow import MlflowClient

    experiment = _experiment(params)
    found = _find_run(experiment, f"tags.`{PIPELINE}` = '{fingerprint}' and "
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
        experiment = _experiment(params)
        found = _find_run(experiment, f"tags.`{TRAIN_RUN}` = '{name}' and "
                                      f"tags.`mlflow.parentRunId` = '{parent}'")
        if found is None:
            client = MlflowClient()
            found = client.create_run(experiment, run_name=f"train_phase{phase}", tags={
                TRAIN_RUN: name, "mlflow.parentRunId": parent}).info.run_id
            client.log_param(found, "run", name)
    return MlflowSink(uri, found, params.mlflow.timeout_s)


def git_commit() -> str:
    try:
        return subprocess.run(["git", "rev-parse", "HEAD"], capture_output=True, text=True,
                              check=True, timeout=10).stdout.strip()
    except (OSError, subprocess.SubprocessError):
        return "unknown"


def _flat(tree: Any, prefix: str = "") -> dict[str, str]:
    if isinstance(tree, dict):
        out: dict[str, str] = {}
        for key, value in tree.items():
            out.update(_flat(value, f"{prefix}{key}."))
        return out
    return {prefix[:-1]: json.dumps(tree) if isinstance(tree, list) else str(tree)}


def _numbers(tree: Any) -> dict[str, float]:
    out = {}
    for key, value in _flat(tree).items():
        try:
            out[key] = float(value)
        except ValueError:
            continue
    return out


def check_evaluated(params: Params) -> str:
    """The model's weights hash, if the evaluation exists and describes these weights."""
    from fusion.engine.checkpoint import weights_digest
    from fusion.evaluation.evaluate import EVALUATED, SUMMARY

    ev = params.evaluate
    record = Path(ev.out) / EVALUATED
    if not record.exists() or not (Path(ev.out) / SUMMARY).exists():
        raise FusionError(f"{record}: no evaluation of {ev.model} (run `fusion evaluate` or "
                          "`dvc repro evaluate` first); nothing registered")
    digest = weights_digest(ev.model)
    if json.loads(record.read_text()).get("model_sha256") != digest:
        raise FusionError(f"{record}: the evaluation is stale (it describes other weights "
                          f"than {ev.model}); rerun `fusion evaluate`; nothing registered")
    return digest


def _child(parent: str, experiment: str, name: str) -> str:
    """A nested run of the parent by name, created once (reruns reuse it)."""
    from mlflow import MlflowClient

    found = _find_run(experiment, f"tags.`mlflow.parentRunId` = '{parent}' and "
                                  f"attributes.run_name = '{name}'")
    if found:
        return found
    return MlflowClient().create_run(experiment, run_name=name,
                                     tags={"mlflow.parentRunId": parent}).info.run_id


def _find_version(name: str, key: str) -> str | None:
    from mlflow import MlflowClient

    versions = MlflowClient().search_model_versions(
        f"name = '{name}' and tags.`{REGISTRATION}` = '{key}'")
    ready = [v for v in versions if v.status == "READY"]
    return str(max(int(v.version) for v in ready)) if ready else None


def register(params: Params) -> dict[str, Any]:
    """Log the pipeline execution and register its model as ``challenger`` (resumable)."""
    from fusion.engine.runs import fingerprint
    from fusion.evaluation.evaluate import SUMMARY
    from fusion.files import sha256_file, write_text

    digest = check_evaluated(params)
    registered = Path(params.mlflow.registered)
    registered.unlink(missing_ok=True)  # a failure below must not leave a stale record
    uri = connect(params.mlflow)
    name, ev = params.model_name, params.evaluate
    fp = fingerprint(params)
    key = hashlib.sha256(f"{digest}|{sha256_file(Path(ev.out) / SUMMARY)}|{fp}".encode()
                         ).hexdigest()
    with answering(uri):
        version = _find_version(name, key)
        if version is None:
            version = _log_and_register(params, digest, fp, key)
        else:
            print(f"register: version {version} of {name} already holds these weights and "
                  "this evaluation (an earlier run was interrupted); reusing it")
        from mlflow import MlflowClient

        client = MlflowClient()
        client.set_registered_model_alias(name, CHALLENGER, version)
        run_id = client.get_model_version(name, version).run_id
    record = {"tracking_uri": uri, "model_name": name, "version": version, "run_id": run_id,
              "model_uri": f"models:/{name}/{version}", "model_sha256": digest}
    write_text(registered, json.dumps(record, indent=2) + "\n")
    return record


def _log_and_register(params: Params, digest: str, fp: str, key: str) -> str:
    import mlflow
    from mlflow import MlflowClient

    from fusion.engine.runs import manifest_digest
    from fusion.evaluation.evaluate import EVALUATED, SUMMARY
    from fusion.mlops.registry import ONNX, WEIGHTS, log_pyfunc

    ev = params.evaluate
    config = json.loads((Path(ev.model) / "config.json").read_text())
    experiment = _experiment(params)
    parent = pipeline_run(params, fp)
    client = MlflowClient()
    tags = {"git_commit": git_commit(), "dvc_lock_sha256": _sha_or_missing(Path("dvc.lock")),
            "manifest_sha256": manifest_digest(params),  # a folder's or S3's
            "model_sha256": digest, FINGERPRINT: fp, REGISTRATION: key,
            "family": params.model.family, LINEAGE: config.get("lineage", "") or "scratch"}
    try:
        for k, v in tags.items():
            client.set_tag(parent, k, v)
        client.log_batch(parent, params=[mlflow.entities.Param(k, v[:6000]) for k, v in
                                         _flat(to_dict(params)).items()])
        summary_file = Path(params.data.summary)
        counts = json.loads(summary_file.read_text()) if summary_file.exists() else {}
        prepare = _child(parent, experiment, "prepare")
        client.log_batch(prepare, metrics=[mlflow.entities.Metric(k, v, 0, 0)
                                           for k, v in _numbers(counts).items()])
        client.set_terminated(prepare)
        evaluation = _child(parent, experiment, "evaluate")
        client.log_batch(evaluation, metrics=[
            mlflow.entities.Metric(k, v, 0, 0)
            for k, v in _numbers(json.loads((Path(ev.out) / SUMMARY).read_text())).items()])
        client.log_artifacts(evaluation, ev.grids, "grids")
        for file in ("report.md", "per_image.parquet", EVALUATED):
            client.log_artifact(evaluation, str(Path(ev.out) / file), "eval")
        client.set_terminated(evaluation)
        with tempfile.TemporaryDirectory() as tmp, mlflow.start_run(run_id=parent):
            info = log_pyfunc({WEIGHTS: ev.model, ONNX: str(_onnx(params, Path(tmp)))})
        version = mlflow.register_model(info.model_uri, params.model_name, tags=tags)
        chaos.point("register:version-created")
    except BaseException:
        _close(client, parent, "FAILED")
        raise
    _close(client, parent, "FINISHED")
    return str(version.version)


def _onnx(params: Params, folder: Path) -> Path:
    """The model's ONNX export, registered beside the safetensors weights (cached by the
    weights' hash: re-registering the same weights does not export again)."""
    import shutil

    from fusion.engine.checkpoint import load_model, weights_digest
    from fusion.inference.onnx import export_onnx

    digest = weights_digest(params.evaluate.model)
    cache = Path(tempfile.gettempdir()) / "fusion-onnx" / f"{digest}.onnx"
    if not cache.exists():
        export_onnx(load_model(params.evaluate.model), params.family, cache)
    shutil.copy2(cache, folder / "model.onnx")
    return folder / "model.onnx"


def _close(client: Any, run_id: str, status: str) -> None:
    """End a run; best effort when the server is the thing that failed."""
    try:
        client.set_terminated(run_id, status)
    except Exception as exc:  # noqa: BLE001  (the original error matters more)
        print(f"note: could not mark run {run_id} {status}: {type(exc).__name__}")


def _sha_or_missing(path: Path) -> str:
    from fusion.files import sha256_file

    return sha256_file(path) if path.exists() else "missing"


def champion_status(params: Params) -> dict[str, Any]:
    """Whether the current data and params are what the champion was trained from."""
    from mlflow import MlflowClient
    from mlflow.exceptions import MlflowException

    from fusion.engine.runs import fingerprint

    current = fingerprint(params)
    uri = connect(params.mlflow)
    name = params.model_name
    with answering(uri):
        try:
            version = MlflowClient().get_model_version_by_alias(name, CHAMPION)
        except MlflowException as exc:
            if "RESOURCE_DOES_NOT_EXIST" not in str(exc.error_code) and \
                    "not found" not in str(exc).lower():
                raise
            return {"model": name, "fingerprint": current, "champion": None,
                    "champion_fingerprint": None, "unchanged": False}
    theirs = version.tags.get(FINGERPRINT)
    return {"model": name, "fingerprint": current, "champion": str(version.version),
            "champion_fingerprint": theirs, "unchanged": theirs == current}
