"""`fusion serve` on the session's two-node Ray cluster, against a real `mlflow server`, with
a real HTTP client: it fuses as `fusion fuse` does, refuses bad input with a 4xx and keeps
serving, follows the champion alias through a promotion and a rollback with requests
running and none failing, and keeps serving when the registry stops answering."""

from __future__ import annotations

import dataclasses
import io
import threading
import time
from pathlib import Path

import numpy as np
import pytest
import requests
from PIL import Image

from fusion.params import MlflowParams, ServeParams
from tests.conftest import RAY_GROUP, REPO, MlflowServer, free_port, run_cli

pytestmark = RAY_GROUP
TNO = REPO / "data/sample/tno"


def _register(params, folder: Path, onnx: Path) -> str:
    """One version of the family's registered model from an export and its ONNX file, as
    `fusion register` logs it (a pyfunc from code, weights and ONNX as artifacts)."""
    import mlflow

    from fusion.mlops.connection import connect
    from fusion.mlops.pyfunc import ONNX, WEIGHTS, log_pyfunc

    connect(params.mlflow)
    mlflow.set_experiment(params.mlflow.experiment)
    with mlflow.start_run():
        info = log_pyfunc({WEIGHTS: str(folder), ONNX: str(onnx)})
    return str(mlflow.register_model(info.model_uri, params.model_name).version)


def _alias(params, version: str) -> None:
    from mlflow import MlflowClient

    MlflowClient(params.mlflow.tracking_uri).set_registered_model_alias(
        params.model_name, "champion", version)


@pytest.fixture(scope="module")
def registry(tiny_run, tmp_path_factory):
    """A real MLflow server holding two versions of the tiny model (the second perturbed),
    champion on version 1; params that serve it with two replicas."""
    import torch

    from fusion.engine.exports import export_model, load_model
    from fusion.inference.onnx import export_onnx

    tmp = tmp_path_factory.mktemp("serving")
    server = MlflowServer(tmp / "mlflow.db")
    server.start()
    params = dataclasses.replace(
        tiny_run, mlflow=MlflowParams(tracking_uri=server.uri, timeout_s=5.0, retries=0),
        serve=ServeParams(replicas=2, cpus_per_replica=0.5, port=free_port(), poll_s=1.0,
                          max_request_mb=1.0))
    onnx = {}
    for version, noise in (("1", 0.0), ("2", 0.02)):
        model = load_model(tiny_run.train.phase_out(2))
        with torch.no_grad():
            for p in model.parameters():
                p.add_(noise * torch.randn(p.shape, generator=torch.Generator().manual_seed(1)))
        folder = export_model(tmp / f"v{version}", "dae-fuse", tiny_run.config.net, model,
                              None, {"phase": 2})
        onnx[version] = export_onnx(model, params.family, tmp / f"v{version}.onnx")
        assert _register(params, folder, onnx[version]) == version
    _alias(params, "1")
    yield server, params, onnx
    if server.proc.poll() is None:
        server.kill()


@pytest.fixture(scope="module")
def served(ray_cluster, registry):
    from ray import serve

    from fusion.serving.app import APP, run

    _, params, _ = registry
    url = run(params)
    yield url
    serve.delete(APP)
    serve.shutdown()


def _png(array: np.ndarray) -> bytes:
    buffer = io.BytesIO()
    Image.fromarray(array).save(buffer, "PNG")
    return buffer.getvalue()


def _fuse(url: str, a: bytes, b: bytes) -> requests.Response:
    return requests.post(f"{url}/fuse", files={"a": ("a.png", a), "b": ("b.png", b)},
                         timeout=120)


def test_serving_fuses_as_fuse_does_and_refuses_bad_input(served, registry, tmp_path):
    _, params, onnx = registry
    a, b = (TNO / side / "07.png" for side in ("ir", "vi"))
    answer = _fuse(served, a.read_bytes(), b.read_bytes())
    assert answer.status_code == 200, answer.text
    assert answer.headers["X-Fusion-Version"] == "1"
    assert answer.headers["content-type"] == "image/png"
    local = run_cli("fuse", "--engine", "onnxruntime", "--model", str(onnx["1"]), "--a", str(a),
                    "--b", str(b), "-o", str(tmp_path / "local.png"), cwd=tmp_path)
    assert local.returncode == 0, local.stderr
    ours = np.asarray(Image.open(io.BytesIO(answer.content)), np.float64) / 255
    theirs = np.asarray(Image.open(tmp_path / "local.png"), np.float64) / 255
    assert ours.shape == theirs.shape and np.abs(ours - theirs).max() <= 1e-6

    grey = np.full((40, 48), 90, np.uint8)
    bad = _fuse(served, b"\x89PNG\r\n\x1a\nnot really a png", _png(grey))
    assert bad.status_code == 400 and bad.json()["error"].startswith("a (a.png): cannot decode")
    mismatch = _fuse(served, _png(grey), _png(np.full((41, 48), 90, np.uint8)))
    assert mismatch.status_code == 400 and "size mismatch" in mismatch.json()["error"]
    bomb = io.BytesIO()
    Image.new("1", (13000, 13000)).save(bomb, "PNG")  # 40 KB that decode to 169 MP
    huge = _fuse(served, bomb.getvalue(), bomb.getvalue())
    assert huge.status_code == 413 and "over the limit of 50 MP" in huge.json()["error"]
    too_long = _fuse(served, b"x" * (2 * 2**20), _png(grey))  # serve.max_request_mb is 1
    assert too_long.status_code == 413 and "serve.max_request_mb" in too_long.json()["error"]
    assert _fuse(served, a.read_bytes(), b.read_bytes()).status_code == 200  # still serving
    metrics = requests.get(f"{served}/metrics", timeout=30).text
    assert 'fusion_requests_total{code="413",endpoint="/fuse"} 2.0' in metrics
    assert 'fusion_request_seconds_count{endpoint="/fuse"}' in metrics


def _health(url: str) -> list[dict]:
    """Health as several requests see it (they spread over the replicas)."""
    return [requests.get(f"{url}/healthz", timeout=30).json() for _ in range(8)]


def _until(check, timeout: float) -> float:
    """Seconds until ``check()`` held (fails the test after ``timeout``)."""
    started = time.time()
    while not check():
        assert time.time() - started < timeout, "not within the time allowed"
        time.sleep(0.5)
    return time.time() - started


def test_serving_follows_the_alias_and_outlives_the_registry(served, registry):
    server, params, _ = registry
    a, b = ((TNO / side / "07.png").read_bytes() for side in ("ir", "vi"))
    seen: list[tuple[int, str]] = []
    stop = threading.Event()

    def load() -> None:
        while not stop.is_set():
            answer = _fuse(served, a, b)
            seen.append((answer.status_code, answer.headers.get("X-Fusion-Version", "")))

    clients = [threading.Thread(target=load) for _ in range(2)]
    for client in clients:
        client.start()
    try:
        _alias(params, "2")  # a promotion
        took = _until(lambda: {h["version"] for h in _health(served)} == {"2"}, 30)
        _alias(params, "1")  # a rollback
        took = max(took, _until(lambda: {h["version"] for h in _health(served)} == {"1"}, 30))
        server.kill()  # the registry stops answering: version 1 keeps serving
        _until(lambda: all(h["status"] == "degraded" for h in _health(served)), 30)
        health = _health(served)[0]
        assert health["version"] == "1" and server.uri in health["detail"]
        assert _fuse(served, a, b).status_code == 200
    finally:
        stop.set()
        for client in clients:
            client.join()
        if server.proc.poll() is not None:
            server.start()
    assert took < 30
    assert seen and all(code == 200 for code, _ in seen), seen
    assert {version for _, version in seen} == {"1", "2"}
