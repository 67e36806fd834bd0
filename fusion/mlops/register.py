"""``fusion register``: log the pipeline execution to MLflow and register its model as
``challenger``.

``register`` is resumable: the version it creates carries a registration key (model
weights and evaluation); a rerun after any failure finds that version instead of creating
another, (re)writes its model card (``fusion.mlops.model_card``), then sets ``challenger``.
``registered.json`` is removed first and written last, so it is never stale.
"""

from __future__ import annotations

import hashlib
import json
import tempfile
from pathlib import Path
from typing import Any

from fusion import chaos
from fusion.data.prepared import manifest_digest
from fusion.engine.exports import CONFIG_FILE, load_model, weights_digest
from fusion.engine.fingerprints import fingerprint
from fusion.errors import FusionError
from fusion.evaluation.evaluate import EVALUATED, PER_IMAGE, REPORT, SUMMARY
from fusion.files import sha256_file, write_text
from fusion.mlops.connection import answering, connect
from fusion.mlops.model_card import log_card
from fusion.mlops.model_refs import CHALLENGER
from fusion.mlops.pipeline_runs import child_run, experiment_id, pipeline_run
from fusion.mlops.provenance import git_commit, sha_or_missing
from fusion.mlops.pyfunc import ONNX, WEIGHTS, log_pyfunc
from fusion.params import Params, to_dict

FINGERPRINT = "training_fingerprint"  # tag: data + params the version was trained from
REGISTRATION = "fusion.registration"  # version tag: weights + evaluation it registers
LINEAGE = "lineage.init"  # version tag: the warm start the weights descend from


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


def _find_version(name: str, key: str) -> str | None:
    from mlflow import MlflowClient

    versions = MlflowClient().search_model_versions(
        f"name = '{name}' and tags.`{REGISTRATION}` = '{key}'")
    ready = [v for v in versions if v.status == "READY"]
    return str(max(int(v.version) for v in ready)) if ready else None


def register(params: Params) -> dict[str, Any]:
    """Log the pipeline execution and register its model as ``challenger`` (resumable)."""
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
        # the card before the alias: a failure leaves no challenger, and the rerun that
        # finds the version writes the card again
        card = log_card(client, params, name, version, digest)
        client.set_registered_model_alias(name, CHALLENGER, version)
        run_id = client.get_model_version(name, version).run_id
    record = {"tracking_uri": uri, "model_name": name, "version": version, "run_id": run_id,
              "model_uri": f"models:/{name}/{version}", "model_sha256": digest,
              "model_card": card}
    write_text(registered, json.dumps(record, indent=2) + "\n")
    return record


def _log_and_register(params: Params, digest: str, fp: str, key: str) -> str:
    import mlflow
    from mlflow import MlflowClient

    ev = params.evaluate
    config = json.loads((Path(ev.model) / CONFIG_FILE).read_text())
    experiment = experiment_id(params)
    parent = pipeline_run(params, fp)
    client = MlflowClient()
    manifest = manifest_digest(params.train.data, params.ray.storage_endpoint)  # local or S3
    tags = {"git_commit": git_commit(), "dvc_lock_sha256": sha_or_missing(Path("dvc.lock")),
            "manifest_sha256": manifest,
            "model_sha256": digest, FINGERPRINT: fp, REGISTRATION: key,
            "family": params.model.family, LINEAGE: config.get("lineage", "") or "scratch"}
    try:
        for k, v in tags.items():
            client.set_tag(parent, k, v)
        client.log_batch(parent, params=[mlflow.entities.Param(k, v[:6000]) for k, v in
                                         _flat(to_dict(params)).items()])
        summary_file = Path(params.data.summary)
        counts = json.loads(summary_file.read_text()) if summary_file.exists() else {}
        prepare = child_run(parent, experiment, "prepare")
        client.log_batch(prepare, metrics=[mlflow.entities.Metric(k, v, 0, 0)
                                           for k, v in _numbers(counts).items()])
        client.set_terminated(prepare)
        evaluation = child_run(parent, experiment, "evaluate")
        client.log_batch(evaluation, metrics=[
            mlflow.entities.Metric(k, v, 0, 0)
            for k, v in _numbers(json.loads((Path(ev.out) / SUMMARY).read_text())).items()])
        client.log_artifacts(evaluation, ev.grids, "grids")
        for file in (REPORT, PER_IMAGE, EVALUATED):
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
