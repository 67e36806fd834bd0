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
from pathlib import Path

import boto3
import mlflow
import numpy as np
import pytest
import torch
from mlflow import MlflowClient

from fusion.engine.exports import export_model, load_model, load_weights, weights_digest
from fusion.errors import FusionError
from fusion.evaluation.evaluate import Candidate, evaluate
from fusion.evaluation.gain import weighted_gain
from fusion.inference.fuse import TorchEngine
from fusion.mlops.connection import connect
from fusion.mlops.promotion import promote, rollback
from fusion.mlops.register import register
from fusion.params import (
    BenchmarkSet,
    EvaluateParams,
    MlflowParams,
    ModelParams,
    PromoteParams,
)
from tests.conftest import REPO, MlflowServer, free_port

SETS = [BenchmarkSet("tno", str(REPO / "data/sample/tno/ir"), str(REPO / "data/sample/tno/vi"))]


def _setup(tiny_run, tmp: Path, uri: str, floor: str = "none"):
    """tiny_run's models copied under ``tmp``; evaluate/mlflow outputs there too. The tiny
    models are worse than mean fusion, so the promotion floor is off unless asked for."""
    for phase in ("phase1", "phase2"):
        shutil.copytree(tiny_run.train.out + f"/{phase}", tmp / "models" / phase)
    train = dataclasses.replace(tiny_run.train, out=str(tmp / "models"))
    ev = EvaluateParams(model=str(tmp / "models" / "phase2"), sets=SETS, out=str(tmp / "eval"),
                        summary=str(tmp / "metrics"), grids=str(tmp / "grids"))
    ml = MlflowParams(tracking_uri=uri, registered=str(tmp / "registered.json"))
    promote_rule = dataclasses.replace(PromoteParams(), floor=floor)
    return dataclasses.replace(tiny_run, train=train, evaluate=ev, mlflow=ml,
                               promote=promote_rule)


def _evaluate(params) -> dict:
    model = load_model(params.evaluate.model)
    return evaluate(params, [Candidate("model", TorchEngine(model, params.family))],
                    weights_digest(params.evaluate.model))


def _perturb(params, scale: float, seed: int = 0) -> None:
    """Replace the phase II export by noisy weights (a different, worse model)."""
    from fusion.models.dae_fuse.net import build, build_critic

    model_sd, critic_sd = load_weights(params.evaluate.model)
    gen = torch.Generator().manual_seed(seed)
    noisy = {k: v + scale * torch.randn(v.shape, generator=gen) if v.is_floating_point() else v
             for k, v in model_sd.items()}
    model, critic = build(params.config.net), build_critic(params.config.net)
    model.load_state_dict(noisy)
    critic.load_state_dict(critic_sd)
    export_model(params.evaluate.model, params.model.family, params.config.net, model, critic,
                 {"phase": 2, "run": "perturbed"})


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
    _evaluate(params)
    _perturb(params, 0.01)
    with pytest.raises(FusionError, match="stale"):
        register(params)
    connect(params.mlflow)
    assert MlflowClient().search_registered_models() == []  # nothing registered
    with pytest.raises(FusionError, match="no 'challenger'"):
        promote(params)


def test_register_logs_the_pipeline_and_the_first_version_becomes_champion(sqlite_params):
    params = sqlite_params
    _evaluate(params)
    record = register(params)
    assert record["version"] == "1"
    assert json.loads(Path(params.mlflow.registered).read_text()) == record
    name = params.model_name
    assert _aliases(name) == {"challenger": "1"}
    client = MlflowClient()
    parent = client.get_run(record["run_id"])
    for tag in ("git_commit", "dvc_lock_sha256", "manifest_sha256", "model_sha256"):
        assert parent.data.tags[tag]
    assert parent.info.status == "FINISHED" and parent.data.tags["family"] == "dae-fuse"
    assert parent.data.params["model.dae-fuse.phase2.w_text"] == str(
        params.config.phase2.w_text)
    children = client.search_runs([parent.info.experiment_id],
                                  f"tags.mlflow.parentRunId = '{record['run_id']}'")
    by_name = {r.info.run_name: r for r in children}
    # training curves are logged live by the training stages (here: trained outside them)
    assert set(by_name) == {"prepare", "evaluate"}
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


def test_every_registered_version_has_a_model_card(sqlite_params, tmp_path, monkeypatch):
    """register logs model_card/ to the version's run: it names the lineage, carries the
    evaluation table beside the baselines (summary.json's numbers) and its images open; the
    description summarises it. A server that dies while the card is logged is a
    TransientError (exit 75) and the rerun writes the card; promote appends its decision."""
    import re

    import requests
    from PIL import Image

    from fusion.errors import TransientError
    from fusion.metric_names import EIGHT
    from fusion.mlops.model_card import CARD, CARD_DIR

    params, name = sqlite_params, sqlite_params.model_name
    summary = _evaluate(params)["tno"]
    log_artifacts = MlflowClient.log_artifacts

    def dies_on_the_card(self, run_id, local_dir, artifact_path=None):
        if artifact_path == CARD_DIR:
            raise requests.exceptions.ConnectionError("connection refused")
        return log_artifacts(self, run_id, local_dir, artifact_path)

    monkeypatch.setattr(MlflowClient, "log_artifacts", dies_on_the_card)
    with pytest.raises(TransientError, match="stopped answering"):
        register(params)
    assert _aliases(name) == {} and not Path(params.mlflow.registered).exists()
    monkeypatch.setattr(MlflowClient, "log_artifacts", log_artifacts)
    record = register(params)  # finds the version it created, writes the card
    assert record["version"] == "1" and _aliases(name) == {"challenger": "1"}
    assert record["model_card"] == f"runs:/{record['run_id']}/{CARD_DIR}/{CARD}"

    def card(where: str) -> tuple[str, Path]:
        folder = Path(mlflow.artifacts.download_artifacts(
            run_id=record["run_id"], artifact_path=CARD_DIR, dst_path=str(tmp_path / where)))
        return (folder / CARD).read_text(), folder

    text, folder = card("registered")
    assert "| lineage | `scratch`: trained from scratch |" in text
    for method in ("model", "two-scale"):  # the raw table, as summary.json holds it
        cells = " | ".join(f"{summary[method][m]:.3f}" for m in EIGHT)
        label = "**model**" if method == "model" else method
        assert f"| {label} | {cells} |" in text, method
    assert "not a diagnostic device" in text.lower() and "registered" in text.lower()
    images = re.findall(r"!\[[^\]]*\]\(([^)]+)\)", text)
    assert {"phase1_curve.png", "phase2_curve.png", "grid_tno.png"} <= set(images)
    for image in images:
        with Image.open(folder / image) as im:
            im.verify()
    gain = weighted_gain(summary["model"], summary["two-scale"], params.promote.weights)
    description = MlflowClient().get_model_version(name, "1").description
    first, *rest = description.splitlines()
    assert first.startswith("challenger: not judged")
    assert f"tno {gain:+.2%}" in description and "lineage: scratch" in description
    assert rest[-1] == f"model card: {record['model_card']}"

    result = promote(params)
    assert result["promoted"]
    text, _ = card("promoted")
    assert "- decision: **promoted**" in text and f"- reason: {result['reason']}" in text
    description = MlflowClient().get_model_version(name, "1").description
    assert description.splitlines()[0] == f"promoted: {result['reason']}"
    assert description.splitlines()[1:] == rest


def test_promotion_rule_guard_and_rollback(sqlite_params):
    params = dataclasses.replace(sqlite_params, promote=dataclasses.replace(
        sqlite_params.promote, min_improvement=-0.01))
    name = params.model_name
    _evaluate(params)
    register(params)
    assert register(params)["version"] == "1"  # same weights and evaluation: no new version
    promote(params)  # v1 champion
    _perturb(params, 1e-6)  # v2: practically the same model, gain ~0 -> promoted
    _evaluate(params)
    assert register(params)["version"] == "2"
    assert promote(params)["promoted"]
    _perturb(params, 0.5)  # v3: a much worse model -> the guard rejects it
    _evaluate(params)
    register(params)
    result = promote(params)
    assert not result["promoted"]
    assert "drops" in result["reason"] or "not finite" in result["reason"]
    assert _aliases(name) == {"champion": "2"}
    tags = MlflowClient().get_model_version(name, "3").tags
    assert tags["promotion.decision"] == "rejected" and tags["promotion.compared_to"] == "2"
    numbers = json.loads(tags["promotion.numbers"])
    assert set(numbers) == {"challenger", "champion", "gains"}
    client = MlflowClient()
    assert client.get_model_version(name, "3").description.startswith("rejected: ")
    assert rollback(params)["champion"] == "1"
    assert _aliases(name) == {"champion": "1"}
    # the rolled-back version's card and description say so
    assert client.get_model_version(name, "2").description.startswith(
        "rolled back: champion moved back to version 1")
    card = Path(mlflow.artifacts.download_artifacts(
        run_id=client.get_model_version(name, "2").run_id,
        artifact_path="model_card/model_card.md", dst_path=str(params.evaluate.out + "-card")))
    assert "**rolled back**" in card.read_text()
    with pytest.raises(FusionError, match="nothing to roll back"):
        rollback(params)


def test_the_floor_refuses_a_model_below_mean_fusion_even_without_a_champion(tiny_run,
                                                                            tmp_path,
                                                                            monkeypatch):
    """A tiny model trained for a few steps is worse than mean fusion: with no champion it
    is still not promoted, and the decision and its reason are on the version's tags."""
    monkeypatch.chdir(tmp_path)
    params = _setup(tiny_run, tmp_path, f"sqlite:///{tmp_path / 'mlflow.db'}", floor="mean")
    _evaluate(params)
    register(params)
    result = promote(params)
    assert not result["promoted"], result
    assert result["reason"].startswith("below mean fusion on tno")
    assert _aliases(params.model_name) == {}  # judged (challenger cleared), no champion
    tags = MlflowClient().get_model_version(params.model_name, "1").tags
    assert tags["promotion.decision"] == "rejected"
    assert tags["promotion.reason"] == result["reason"]


def test_the_default_floor_refuses_a_model_that_only_beats_mean_fusion(tiny_run, tmp_path,
                                                                        monkeypatch):
    """The default floor is the training-free two-scale rule: a model above mean fusion but
    below the rule (the rule with the visible source's base everywhere) is not promoted,
    even as the first version."""
    from fusion.models.dae_fuse import Config

    monkeypatch.chdir(tmp_path)
    params = _setup(tiny_run, tmp_path, f"sqlite:///{tmp_path / 'mlflow.db'}",
                    floor=PromoteParams().floor)
    assert params.promote.floor == "two-scale"
    config = Config()
    params = dataclasses.replace(params, model=ModelParams(
        "dae-fuse", {**params.model.configs, "dae-fuse": config}))
    model = params.family.network_module().build(config.net)
    with torch.no_grad():  # base weight of A: sigmoid(50 * difference - 100), about 0
        model.fuse_head.bias.copy_(torch.tensor([-100.0, 0.0, 0.0]))
    export_model(params.evaluate.model, "dae-fuse", config.net, model, None, {"phase": 2})
    summary = _evaluate(params)["tno"]
    weights = params.promote.weights
    assert weighted_gain(summary["model"], summary["mean"], weights) > 0
    assert weighted_gain(summary["model"], summary["two-scale"], weights) < 0
    register(params)
    result = promote(params)
    assert not result["promoted"], result
    assert result["reason"].startswith("below two-scale fusion on tno")
    assert _aliases(params.model_name) == {}


def test_warm_start_from_the_champion_records_its_lineage(sqlite_params, tmp_path):
    """train.init @champion resolves to the champion's version; the run name hashes its
    weights; the new version is tagged with the version it was fine-tuned from."""
    from fusion.engine.exports import read_config
    from fusion.engine.fingerprints import run_name
    from fusion.engine.local_runner import train_local
    from fusion.mlops.model_refs import resolve_start
    from fusion.mlops.register import LINEAGE

    params = sqlite_params
    _evaluate(params)
    register(params)
    promote(params)  # version 1: champion (floor off for tiny models)
    out = tmp_path / "warm"
    train = dataclasses.replace(params.train, init="@champion", out=str(out),
                                curves=str(tmp_path), checkpoints=str(tmp_path / "ck"),
                                steps=[5, 5])
    warm = dataclasses.replace(params, train=train,
                               evaluate=dataclasses.replace(params.evaluate,
                                                            model=str(out / "phase2")))
    start = resolve_start(warm)
    source = f"models:/{params.model_name}/1"
    assert start.warm and start.source == source
    assert run_name(warm, 1, start) != run_name(warm, 1)
    for phase in (1, 2):
        train_local(warm, phase, start)
    assert read_config(out / "phase2")["lineage"] == source
    _evaluate(warm)
    record = register(warm)
    assert record["version"] == "2"
    tags = MlflowClient().get_model_version(params.model_name, "2").tags
    assert tags[LINEAGE] == source


def test_concurrent_promotions_leave_consistent_aliases(sqlite_params):
    params = sqlite_params
    _evaluate(params)
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
    assert _aliases(params.model_name) == {"champion": "1"}


def test_champion_loads_in_a_fresh_process_and_fuses(sqlite_params, tmp_path):
    params = sqlite_params
    _evaluate(params)
    register(params)
    promote(params)
    ref = f"models:/{params.model_name}@champion"
    code = ("import mlflow, numpy as np\n"
            f"m = mlflow.pyfunc.load_model({ref!r})\n"
            "out = m.predict(np.random.rand(2, 37, 50).astype('float32'))\n"
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
    ours = load_model(params.evaluate.model)
    theirs = mlflow.pyfunc.load_model(ref).unwrap_python_model().engine.model
    x = torch.rand(1, 1, 40, 40)
    # the served engine runs channels-last: the same weights, other summation order
    assert torch.allclose(ours.fuse(x, x), theirs.fuse(x, x), atol=1e-6)
    # weights are stored as safetensors, with no pickled model object
    files = {p.name for p in Path(mlflow.artifacts.download_artifacts(ref)).rglob("*")}
    assert "model.safetensors" in files and not any(f.endswith((".pkl", ".pickle"))
                                                     for f in files)


def test_unreachable_tracking_server_is_a_clear_error():
    uri = f"http://127.0.0.1:{free_port()}"
    with pytest.raises(FusionError, match=f"{uri} is unreachable"):
        connect(MlflowParams(tracking_uri=uri))


@pytest.fixture
def mlflow_server(s3_server, postgres, tmp_path):
    """A team's tracking server: metadata and registry in PostgreSQL, artifacts in S3."""
    boto3.client("s3", endpoint_url=s3_server).create_bucket(Bucket="mlflow-artifacts")
    server = MlflowServer(tmp_path / "server.db", "s3://mlflow-artifacts/store",
                          {"MLFLOW_S3_ENDPOINT_URL": s3_server},
                          backend=postgres.database(f"mlflow_{tmp_path.name.lower()}"))
    server.start()
    yield server.uri
    server.kill(15)


def test_server_on_postgres_with_s3_artifacts_survives_a_database_restart(
        mlflow_server, s3_server, postgres, tiny_run, tmp_path, monkeypatch):
    """Register, then PostgreSQL restarts (down for 2 s): the promotion that follows is
    answered once the database is back (the server answers 503 meanwhile, which the client
    retries: `mlflow.retries`, 2 by default, waits 1 s then 2 s), and the registry holds
    the champion."""
    import threading
    import time

    monkeypatch.chdir(tmp_path)
    monkeypatch.delenv("MLFLOW_S3_ENDPOINT_URL", raising=False)  # the client needs no S3
    params = _setup(tiny_run, tmp_path, mlflow_server)
    _evaluate(params)
    register(params)
    postgres.stop()
    back = threading.Timer(2.0, postgres.start)
    back.start()
    started = time.monotonic()
    try:
        assert promote(params)["promoted"]
    finally:
        back.join()
    assert time.monotonic() - started >= 2.0  # it was answered only after the restart
    model = mlflow.pyfunc.load_model(f"models:/{params.model_name}@champion")
    fused = model.predict(np.stack([np.zeros((24, 24), np.float32),
                                    np.ones((24, 24), np.float32)]))
    assert fused.shape == (24, 24)
    keys = [o["Key"] for o in boto3.client("s3", endpoint_url=s3_server).list_objects_v2(
        Bucket="mlflow-artifacts")["Contents"]]
    assert any(k.endswith("model.safetensors") for k in keys)


def test_connect_leaves_the_users_tracking_variable_alone(tmp_path, monkeypatch):
    """MLflow exports the URI it is given as $MLFLOW_TRACKING_URI; a later child process
    (a flow's stage) would then read another registry than its params say."""
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    connect(MlflowParams(tracking_uri=f"sqlite:///{tmp_path / 'a.db'}"))
    assert "MLFLOW_TRACKING_URI" not in os.environ
    assert mlflow.get_tracking_uri() == f"sqlite:///{tmp_path / 'a.db'}"
    monkeypatch.setenv("MLFLOW_TRACKING_URI", f"sqlite:///{tmp_path / 'user.db'}")
    connect(MlflowParams(tracking_uri=f"sqlite:///{tmp_path / 'b.db'}"))
    assert os.environ["MLFLOW_TRACKING_URI"] == f"sqlite:///{tmp_path / 'user.db'}"
