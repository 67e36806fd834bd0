"""MLflow tracking, registry and promotion against a real store: an SQLite file (embedded)
and a real `mlflow server` process with artifacts on a moto S3 server, both on loopback."""

from __future__ import annotations

import dataclasses
import json
import os
import shutil
import subprocess
import sys
import threading
import time
import urllib.request
from pathlib import Path

import boto3
import mlflow
import numpy as np
import pytest
import torch
from mlflow import MlflowClient

from fusion.checkpoint import export_model, load_model, load_weights
from fusion.errors import FusionError
from fusion.evaluate import evaluate
from fusion.model import DAEFuse
from fusion.params import BenchmarkSet, EvaluateParams, MlflowParams
from fusion.promotion import promote, rollback
from fusion.tracking import connect, register
from fusion.train import Discriminators
from tests.conftest import REPO, free_port

SETS = [BenchmarkSet("tno", str(REPO / "data/sample/tno/ir"), str(REPO / "data/sample/tno/vi"))]


def _setup(tiny_run, tmp: Path, uri: str):
    """tiny_run's models copied under ``tmp``; evaluate/mlflow outputs there too."""
    for phase in ("phase1", "phase2"):
        shutil.copytree(getattr(tiny_run.train, f"{phase}_out"), tmp / phase)
    train = dataclasses.replace(tiny_run.train, phase1_out=str(tmp / "phase1"),
                                phase2_out=str(tmp / "phase2"))
    ev = EvaluateParams(model=str(tmp / "phase2"), sets=SETS, out=str(tmp / "eval"),
                        summary=str(tmp / "metrics.json"), grids=str(tmp / "grids"))
    ml = MlflowParams(tracking_uri=uri, registered=str(tmp / "registered.json"))
    return dataclasses.replace(tiny_run, train=train, evaluate=ev, mlflow=ml)


def _perturb(params, scale: float, seed: int = 0) -> None:
    """Replace the phase II export by noisy weights (a different, worse model)."""
    model_sd, disc_sd = load_weights(params.train.phase2_out)
    gen = torch.Generator().manual_seed(seed)
    noisy = {k: v + scale * torch.randn(v.shape, generator=gen) if v.is_floating_point() else v
             for k, v in model_sd.items()}
    model, disc = DAEFuse(params.model), Discriminators(params.model)
    model.load_state_dict(noisy)
    disc.load_state_dict(disc_sd)
    export_model(params.train.phase2_out, model, disc, {"phase": 2, "run": "perturbed"})


def _aliases(name: str) -> dict[str, str]:
    return {k: str(v) for k, v in MlflowClient().get_registered_model(name).aliases.items()}


@pytest.fixture
def sqlite_params(tiny_run, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)  # MLflow's default artifact root is ./mlruns
    return _setup(tiny_run, tmp_path, f"sqlite:///{tmp_path / 'mlflow.db'}")


def test_register_refuses_missing_or_stale_evaluation(sqlite_params):
    params = sqlite_params
    with pytest.raises(FusionError, match="no evaluation"):
        register(params)
    evaluate(params)
    _perturb(params, 0.01)
    with pytest.raises(FusionError, match="stale"):
        register(params)
    connect(params.mlflow.tracking_uri)
    assert MlflowClient().search_registered_models() == []  # nothing registered
    with pytest.raises(FusionError, match="no 'challenger'"):
        promote(params)


def test_register_logs_the_pipeline_and_the_first_version_becomes_champion(sqlite_params):
    params = sqlite_params
    evaluate(params)
    record = register(params)
    assert record["version"] == "1"
    assert json.loads(Path(params.mlflow.registered).read_text()) == record
    name = params.mlflow.model_name
    assert _aliases(name) == {"challenger": "1"}
    client = MlflowClient()
    parent = client.get_run(record["run_id"])
    for tag in ("git_commit", "dvc_lock_sha256", "manifest_sha256", "model_sha256"):
        assert parent.data.tags[tag]
    assert parent.data.params["loss.w_text"] == str(params.loss.w_text)
    children = client.search_runs([parent.info.experiment_id],
                                  f"tags.mlflow.parentRunId = '{record['run_id']}'")
    by_name = {r.info.run_name: r for r in children}
    assert set(by_name) == {"prepare", "train_phase1", "train_phase2", "evaluate"}
    history = client.get_metric_history(by_name["train_phase2"].info.run_id, "loss")
    assert [m.step for m in history] == list(range(5, 31, 5))
    assert by_name["evaluate"].data.metrics["tno.model.VIF"] > 0
    artifacts = {a.path for a in client.list_artifacts(by_name["evaluate"].info.run_id, "eval")}
    assert {"eval/report.md", "eval/per_image.parquet"} <= artifacts

    result = promote(params)
    assert result["promoted"] and result["reason"].startswith("first version")
    assert _aliases(name) == {"champion": "1"}
    tags = client.get_model_version(name, "1").tags
    assert tags["promotion.decision"] == "promoted"
    with pytest.raises(FusionError, match="no 'challenger'"):
        promote(params)


def test_promotion_rule_guard_and_rollback(sqlite_params):
    params = sqlite_params
    name = params.mlflow.model_name
    evaluate(params)
    register(params)
    promote(params)  # v1 champion
    register(params)  # v2: the same weights, gain 0 >= min_improvement 0 -> promoted
    assert promote(params)["promoted"]
    _perturb(params, 0.5)  # v3: a much worse model -> the guard rejects it
    evaluate(params)
    register(params)
    result = promote(params)
    assert not result["promoted"]
    assert "drops" in result["reason"] or "not finite" in result["reason"]
    assert _aliases(name) == {"champion": "2"}
    tags = MlflowClient().get_model_version(name, "3").tags
    assert tags["promotion.decision"] == "rejected" and tags["promotion.compared_to"] == "2"
    numbers = json.loads(tags["promotion.numbers"])
    assert set(numbers) == {"challenger", "champion", "gains"}
    assert rollback(params)["champion"] == "1"
    assert _aliases(name) == {"champion": "1"}
    with pytest.raises(FusionError, match="nothing to roll back"):
        rollback(params)


def test_concurrent_promotions_leave_consistent_aliases(sqlite_params):
    params = sqlite_params
    evaluate(params)
    register(params)
    outcomes: list[object] = []

    def attempt() -> None:
        try:
            outcomes.append(promote(params))
        except FusionError as exc:
            outcomes.append(exc)

    threads = [threading.Thread(target=attempt) for _ in range(2)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert sum(isinstance(o, dict) for o in outcomes) == 1  # the other found no challenger
    assert _aliases(params.mlflow.model_name) == {"champion": "1"}


def test_champion_loads_in_a_fresh_process_and_fuses(sqlite_params, tmp_path):
    params = sqlite_params
    evaluate(params)
    register(params)
    promote(params)
    ref = f"models:/{params.mlflow.model_name}@champion"
    code = ("import mlflow, numpy as np\n"
            f"m = mlflow.pyfunc.load_model({ref!r})\n"
            "out = m.predict({'a': np.random.rand(37, 50).astype('float32'),"
            " 'b': np.random.rand(37, 50).astype('float32')})\n"
            "print(out.shape, out.dtype, float(out.min()) >= 0)\n")
    env = {**os.environ, "MLFLOW_TRACKING_URI": params.mlflow.tracking_uri}
    done = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True,
                          text=True, timeout=300, cwd=tmp_path)
    assert done.returncode == 0, done.stderr
    assert done.stdout.strip() == "(37, 50) float32 True"
    a, b = Path(SETS[0].a), Path(SETS[0].b)
    pair = sorted(a.iterdir())[0].name
    done = subprocess.run([sys.executable, "-m", "fusion.cli", "fuse", "--model", ref,
                           "--a", str(a / pair), "--b", str(b / pair), "-o",
                           str(tmp_path / "fused.png")], env=env, capture_output=True,
                          text=True, timeout=300, cwd=tmp_path)
    assert done.returncode == 0, done.stderr
    ours = load_model(params.train.phase2_out)
    theirs = mlflow.pyfunc.load_model(ref).unwrap_python_model().model
    x = torch.rand(1, 1, 40, 40)
    assert torch.equal(ours.fuse(x, x), theirs.fuse(x, x))
    # weights are stored as safetensors, with no pickled model object
    files = {p.name for p in Path(mlflow.artifacts.download_artifacts(ref)).rglob("*")}
    assert "model.safetensors" in files and not any(f.endswith((".pkl", ".pickle"))
                                                     for f in files)


def test_unreachable_tracking_server_is_a_clear_error():
    uri = f"http://127.0.0.1:{free_port()}"
    with pytest.raises(FusionError, match=f"{uri} is unreachable"):
        connect(uri)


@pytest.fixture
def mlflow_server(s3_server, tmp_path):
    boto3.client("s3", endpoint_url=s3_server).create_bucket(Bucket="mlflow-artifacts")
    port = free_port()
    env = {**os.environ, "MLFLOW_S3_ENDPOINT_URL": s3_server,
           "MLFLOW_SERVER_ENABLE_JOB_EXECUTION": "false"}
    proc = subprocess.Popen(
        [sys.executable, "-m", "mlflow", "server", "--host", "127.0.0.1", "--port", str(port),
         "--backend-store-uri", f"sqlite:///{tmp_path / 'server.db'}",
         "--artifacts-destination", "s3://mlflow-artifacts/store", "--workers", "1"],
        env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    uri = f"http://127.0.0.1:{port}"
    deadline = time.time() + 120
    while True:
        try:
            urllib.request.urlopen(f"{uri}/health", timeout=2)
            break
        except OSError:
            if proc.poll() is not None or time.time() > deadline:
                proc.kill()
                pytest.fail(f"mlflow server did not start: {proc.stderr.read()[-2000:]}")
            time.sleep(1)
    yield uri
    proc.terminate()
    proc.wait(timeout=30)


def test_server_mode_with_s3_artifacts(mlflow_server, s3_server, tiny_run, tmp_path,
                                       monkeypatch):
    monkeypatch.chdir(tmp_path)
    monkeypatch.delenv("MLFLOW_S3_ENDPOINT_URL", raising=False)  # the client needs no S3
    params = _setup(tiny_run, tmp_path, mlflow_server)
    evaluate(params)
    register(params)
    assert promote(params)["promoted"]
    model = mlflow.pyfunc.load_model(f"models:/{params.mlflow.model_name}@champion")
    fused = model.predict({"a": np.zeros((24, 24), np.float32),
                           "b": np.ones((24, 24), np.float32)})
    assert fused.shape == (24, 24)
    keys = [o["Key"] for o in boto3.client("s3", endpoint_url=s3_server).list_objects_v2(
        Bucket="mlflow-artifacts")["Contents"]]
    assert any(k.endswith("model.safetensors") for k in keys)
