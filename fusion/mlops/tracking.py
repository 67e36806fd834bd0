"""MLflow side of the pipeline: one run per pipeline execution and a registry entry per model.

``register`` (the last DVC stage) logs, from the files the earlier stages left:
a parent run with every parameter and the provenance tags (git commit, ``dvc.lock`` hash,
dataset manifest hash, model weights hash); nested runs ``prepare``, ``train_phase1``,
``train_phase2`` (loss curves by step) and ``evaluate`` (metrics per set, report, grids,
per-image table); the model as a pyfunc; then a new registry version with alias
``challenger``. It refuses to register when the evaluation is missing or describes other
weights.
"""

from __future__ import annotations

import csv
import json
import os
import subprocess
import urllib.error
import urllib.request
from pathlib import Path
from typing import Any

import mlflow
import numpy as np
from mlflow import MlflowClient
from mlflow.models import ModelSignature
from mlflow.types import Schema, TensorSpec

from fusion.errors import FusionError, TransientError
from fusion.evaluate import EVALUATED, model_digest
from fusion.params import Params, to_dict
from fusion.runs import file_sha, fingerprint
from fusion.serving import WEIGHTS

DEFAULT_URI = "sqlite:///mlflow.db"
FINGERPRINT = "training_fingerprint"  # tag: data + params the version was trained from
CHALLENGER, CHAMPION = "challenger", "champion"
ENTRY = Path(__file__).with_name("mlflow_model.py")


def tracking_uri(configured: str) -> str:
    return configured or os.environ.get("MLFLOW_TRACKING_URI", "") or DEFAULT_URI


def connect(configured: str) -> str:
    """Point MLflow at the configured store; a server that does not answer is a clear
    error naming its URI (MLflow itself would retry for minutes, then dump a trace)."""
    uri = tracking_uri(configured)
    if uri.startswith(("http://", "https://")):
        try:
            with urllib.request.urlopen(f"{uri.rstrip('/')}/health", timeout=10) as reply:
                reply.read()
        except (urllib.error.URLError, OSError) as exc:
            raise TransientError(f"MLflow tracking server {uri} is unreachable: {exc}") from exc
    mlflow.set_tracking_uri(uri)
    mlflow.set_registry_uri(uri)
    return uri


def _git_commit() -> str:
    try:
        return subprocess.run(["git", "rev-parse", "HEAD"], capture_output=True, text=True,
                              check=True).stdout.strip()
    except (OSError, subprocess.CalledProcessError):
        return "unknown"


def _flat(tree: Any, prefix: str = "") -> dict[str, str]:
    if isinstance(tree, dict):
        out: dict[str, str] = {}
        for key, value in tree.items():
            out.update(_flat(value, f"{prefix}{key}."))
        return out
    return {prefix[:-1]: json.dumps(tree) if isinstance(tree, list) else str(tree)}


def _curve(path: Path) -> list[dict[str, float]]:
    if not path.exists():
        return []
    with path.open() as fh:
        return [{k: float(v) for k, v in row.items() if v != ""} for row in csv.DictReader(fh)]


def _log_curve(path: Path) -> None:
    client, run = MlflowClient(), mlflow.active_run().info.run_id
    metrics = [mlflow.entities.Metric(key, value, int(row.get("time", 0) * 1000),
                                      int(row["step"]))
               for row in _curve(path) for key, value in row.items()
               if key not in ("step", "time")]
    for start in range(0, len(metrics), 1000):
        client.log_batch(run, metrics=metrics[start:start + 1000])


def check_evaluated(params: Params) -> str:
    """The model's weights hash, if the evaluate outputs exist and describe these weights."""
    ev, model = params.evaluate, params.train.phase2_out
    record = Path(ev.out) / EVALUATED
    if not record.exists() or not Path(ev.summary).exists():
        raise FusionError(f"{record}: no evaluation of {model} (run `fusion evaluate` or "
                          "`dvc repro evaluate` first); nothing registered")
    digest = model_digest(model)
    if json.loads(record.read_text()).get("model_sha256") != digest:
        raise FusionError(f"{record}: the evaluation is stale (it describes other weights "
                          f"than {model}); rerun `fusion evaluate`; nothing registered")
    return digest


def signature() -> ModelSignature:
    image = TensorSpec(np.dtype(np.float32), (-1, -1))
    return ModelSignature(inputs=Schema([TensorSpec(np.dtype(np.float32), (-1, -1), "a"),
                                         TensorSpec(np.dtype(np.float32), (-1, -1), "b")]),
                          outputs=Schema([image]))


def requirements() -> list[str]:
    """Pinned runtime needs of the pyfunc (given, so MLflow does not load the model in a
    subprocess to guess them)."""
    from importlib.metadata import version

    return [f"{name}=={version(name)}" for name in
            ("torch", "torchvision", "timm", "kornia", "safetensors", "numpy", "pillow",
             "pyarrow", "pyyaml", "mlflow")]


def register(params: Params) -> dict[str, Any]:
    """Log the pipeline execution and register its model as ``challenger``."""
    digest = check_evaluated(params)
    m, t, ev = params.mlflow, params.train, params.evaluate
    uri = connect(m.tracking_uri)
    mlflow.set_experiment(m.experiment)
    tags = {"git_commit": _git_commit(), "dvc_lock_sha256": file_sha(Path("dvc.lock")),
            "manifest_sha256": file_sha(Path(t.data) / "manifest.parquet"),
            "model_sha256": digest, FINGERPRINT: fingerprint(params)}
    with mlflow.start_run(run_name="pipeline", tags=tags) as parent:
        mlflow.log_params(_flat(to_dict(params)))
        with mlflow.start_run(run_name="prepare", nested=True):
            summary = Path(params.data.summary)
            if summary.exists():
                counts = json.loads(summary.read_text())
                mlflow.log_metrics({k: float(v) for k, v in _flat(counts).items()
                                    if _is_number(v)})
        for phase, out in ((1, t.phase1_out), (2, t.phase2_out)):
            with mlflow.start_run(run_name=f"train_phase{phase}", nested=True):
                config = json.loads((Path(out) / "config.json").read_text())
                mlflow.log_params({k: str(v) for k, v in config.items() if k != "model"})
                _log_curve(Path(t.curves) / f"phase{phase}_curve.csv")
        with mlflow.start_run(run_name="evaluate", nested=True):
            scores = json.loads(Path(ev.summary).read_text())
            mlflow.log_metrics({k: float(v) for k, v in _flat(scores).items()
                                if _is_number(v)})
            mlflow.log_artifacts(ev.grids, "grids")
            for name in ("report.md", "per_image.parquet", EVALUATED):
                mlflow.log_artifact(str(Path(ev.out) / name), "eval")
        example = {"a": np.zeros((32, 32), np.float32), "b": np.ones((32, 32), np.float32)}
        info = mlflow.pyfunc.log_model(
            name="model", python_model=str(ENTRY), artifacts={WEIGHTS: t.phase2_out},
            signature=signature(), input_example=example, pip_requirements=requirements())
        version = mlflow.register_model(info.model_uri, m.model_name, tags=tags)
        client = MlflowClient()
        client.set_registered_model_alias(m.model_name, CHALLENGER, version.version)
    record = {"tracking_uri": uri, "model_name": m.model_name, "version": str(version.version),
              "run_id": parent.info.run_id, "model_uri": f"models:/{m.model_name}/"
              f"{version.version}", "model_sha256": digest}
    Path(m.registered).parent.mkdir(parents=True, exist_ok=True)
    Path(m.registered).write_text(json.dumps(record, indent=2) + "\n")
    return record


def champion_status(params: Params) -> dict[str, Any]:
    """Whether the current data and params are what the champion was trained from."""
    current = fingerprint(params)
    connect(params.mlflow.tracking_uri)
    name = params.mlflow.model_name
    try:
        version = MlflowClient().get_model_version_by_alias(name, CHAMPION)
    except mlflow.exceptions.MlflowException:
        return {"model": name, "fingerprint": current, "champion": None,
                "champion_fingerprint": None, "unchanged": False}
    theirs = version.tags.get(FINGERPRINT)
    return {"model": name, "fingerprint": current, "champion": str(version.version),
            "champion_fingerprint": theirs, "unchanged": theirs == current}


def _is_number(value: str) -> bool:
    try:
        float(value)
    except ValueError:
        return False
    return True
