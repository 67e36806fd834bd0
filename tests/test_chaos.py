"""Fault drills against real processes: an `mlflow server` process group killed and
restarted, crashes at the worst moment, a stale local Ray session, inputs built to
exhaust memory. (Checkpoint drills on Ray Train: test_ray_train.py.)"""

from __future__ import annotations

import dataclasses
import json
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest
import yaml

from fusion.params import BenchmarkSet, EvaluateParams, MlflowParams, PromoteParams, to_dict
from tests.conftest import RAY_GROUP, REPO, MlflowServer, free_port, run_cli


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    srv = MlflowServer(tmp_path_factory.mktemp("mlflow") / "server.db")
    srv.start()
    yield srv
    if srv.proc.poll() is None:
        srv.kill()


def _workdir(tiny_run, tmp: Path, uri: str, perturb: float = 0.0) -> Path:
    """A folder with a params file, the tiny model (optionally perturbed: other weights)
    and its evaluation, ready for `fusion register`."""
    import shutil

    from fusion.engine.exports import export_model, load_model, load_weights, weights_digest
    from fusion.evaluation.evaluate import Candidate, evaluate
    from fusion.inference.fuse import TorchEngine

    shutil.copytree(tiny_run.train.phase_out(2), tmp / "model")
    if perturb:
        import torch

        from fusion.models.dae_fuse.net import build, build_critic

        net, critic = load_weights(tmp / "model")
        model, disc = build(tiny_run.config.net), build_critic(tiny_run.config.net)
        model.load_state_dict({k: v + perturb if v.is_floating_point() else v
                               for k, v in net.items()})
        disc.load_state_dict(critic)
        export_model(tmp / "model", "dae-fuse", tiny_run.config.net, model, disc, {"phase": 2})
        torch.manual_seed(0)
    sample = REPO / "data/sample/tno"
    params = dataclasses.replace(
        tiny_run,
        evaluate=EvaluateParams(model=str(tmp / "model"), out=str(tmp / "eval"),
                                sets=[BenchmarkSet("tno", str(sample / "ir"),
                                                   str(sample / "vi"))],
                                summary=str(tmp / "metrics"), grids=str(tmp / "grids")),
        mlflow=MlflowParams(tracking_uri=uri, registered=str(tmp / "registered.json")),
        promote=PromoteParams(floor="none", min_improvement=-1.0, max_drop=1.0))
    evaluate(params, [Candidate("model", TorchEngine(load_model(tmp / "model"),
                                                     params.family))],
             weights_digest(tmp / "model"))
    (tmp / "params.yaml").write_text(yaml.safe_dump(to_dict(params), sort_keys=False))
    return tmp


def _aliases(uri: str) -> dict[str, str]:
    from mlflow import MlflowClient

    model = MlflowClient(uri, uri).get_registered_model("dae-fuse")
    return {k: str(v) for k, v in model.aliases.items()}


def _running_pipelines(uri: str) -> list[str]:
    from mlflow import MlflowClient

    client = MlflowClient(uri)
    experiment = client.get_experiment_by_name("fusion")
    runs = client.search_runs([experiment.experiment_id],
                              "attributes.run_name = 'pipeline' and attributes.status = "
                              "'RUNNING'")
    return [r.info.run_id for r in runs]


def test_register_survives_a_crash_and_a_dead_server(server, tiny_run, tmp_path):
    first = _workdir(tiny_run, tmp_path / "first", server.uri)
    assert run_cli("register", cwd=first).returncode == 0
    assert _aliases(server.uri) == {"challenger": "1"}

    # 1. the process dies right after the version is created: version 2 has no alias yet
    second = _workdir(tiny_run, tmp_path / "second", server.uri, perturb=1e-3)
    crashed = run_cli("register", cwd=second, env={"FUSION_CHAOS": "register:version-created"})
    assert crashed.returncode == 70, crashed.stderr
    assert _aliases(server.uri) == {"challenger": "1"}
    assert not (second / "registered.json").exists()  # never stale: removed first
    refused = run_cli("promote", cwd=second)
    assert refused.returncode == 2
    assert "the challenger is version 1, but version 2 is newer" in refused.stderr
    assert _aliases(server.uri) == {"challenger": "1"}  # nothing was judged
    rerun = run_cli("register", cwd=second)
    assert rerun.returncode == 0, rerun.stderr
    assert "version 2 of dae-fuse already holds these weights" in rerun.stdout
    assert _aliases(server.uri) == {"challenger": "2"}
    assert json.loads((second / "registered.json").read_text())["version"] == "2"
    assert _running_pipelines(server.uri) == []  # the crashed run was closed by the rerun

    # 2. the whole server process group is killed mid-register: exit 75 in bounded time
    third = _workdir(tiny_run, tmp_path / "third", server.uri, perturb=2e-3)
    started = time.time()
    proc = subprocess.Popen([sys.executable, "-m", "fusion.cli", "register"], cwd=third,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    while not _running_pipelines(server.uri) and proc.poll() is None:
        time.sleep(0.05)  # register has opened its pipeline run: it is talking to the server
    server.kill()
    _, err = proc.communicate(timeout=120)
    assert proc.returncode == 75, err
    assert time.time() - started < 60 + 4
    assert server.uri in err and "Traceback" not in err and err.count("\n") == 1
    server.start()  # same port, same database
    rerun = run_cli("register", cwd=third)
    assert rerun.returncode == 0, rerun.stderr
    record = json.loads((third / "registered.json").read_text())
    assert _aliases(server.uri)["challenger"] == record["version"] == "3"
    assert _running_pipelines(server.uri) == []
    promoted = run_cli("promote", cwd=third)
    assert promoted.returncode == 0 and _aliases(server.uri) == {"champion": "3"}


def test_a_dead_server_is_exit_75_naming_it(tmp_path):
    uri = f"http://127.0.0.1:{free_port()}"
    for command in (["status"], ["promote"], ["register"]):
        run = run_cli(*command, "--set", f"mlflow.tracking_uri={uri}", cwd=tmp_path,
                      timeout=120)
        if command == ["register"]:  # checks its inputs first
            assert run.returncode == 2 and "no evaluation" in run.stderr
        else:
            assert run.returncode == 75 and f"{uri} is unreachable" in run.stderr, command


@RAY_GROUP
def test_a_stale_local_ray_session_is_never_joined(tmp_path):
    """A local Ray whose processes died by kill -9 leaves its address in the session file;
    with no address configured the next run starts its own instance."""
    temp = Path("/tmp/ray")
    temp.mkdir(exist_ok=True)
    session = temp / "ray_current_cluster"
    saved = session.read_text() if session.exists() else None
    session.write_text(f"127.0.0.1:{free_port()}")  # nothing answers there
    code = ("from fusion.engine.cluster import connect\nprint(connect(''))\nimport ray\n"
            "print(ray.get(ray.put(41)) + 1)\nray.shutdown()\n")
    env = {k: v for k, v in os.environ.items() if k != "RAY_ADDRESS"}
    try:
        done = subprocess.run([sys.executable, "-c", code], cwd=tmp_path, env=env,
                              capture_output=True, text=True, timeout=180)
    finally:
        if saved is None:
            session.unlink(missing_ok=True)
        else:
            session.write_text(saved)
    assert done.returncode == 0, done.stderr
    assert done.stdout.split() == ["local", "42"]


def test_an_image_bigger_than_the_pixel_limit_is_refused_fast(tiny_run, tmp_path):
    """A 39 KB 1-bit PNG of 13000x13000 pixels: refused from its header, within seconds
    and without a model loaded."""
    from PIL import Image

    for side in ("a", "b"):
        Image.new("1", (13000, 13000)).save(tmp_path / f"{side}.png")
    started = time.time()
    run = run_cli("fuse", "--model", str(tiny_run.train.phase_out(2)), "--a",
                  str(tmp_path / "a.png"), "--b", str(tmp_path / "b.png"), "-o",
                  str(tmp_path / "out.png"))
    assert run.returncode == 2
    assert "13000x13000 is 169 MP, over the limit of 50 MP (data.max_pixels)" in run.stderr
    assert time.time() - started < 30 and not (tmp_path / "out.png").exists()
