"""Ray Train runs of both phases on a real (two-node, local) Ray cluster: placement,
fault tolerance, S3 checkpoints and agreement with the single-process loop."""

from __future__ import annotations

import csv
import io
import json
from dataclasses import replace
from pathlib import Path

import boto3
import numpy as np
import pytest
import ray
import torch
from safetensors.torch import load_file

from fusion.engine.cluster import storage
from fusion.engine.ray_runner import Fault, train_ray
from fusion.engine.runs import run_name
from fusion.errors import FusionError
from fusion.params import Params, RayParams


def _ray_params(base: Params, tmp: Path, **ray) -> Params:
    """``base`` (its prepared data) with outputs under ``tmp`` and the given Ray settings."""
    train = replace(base.train, out=str(tmp / "models"), curves=str(tmp / "reports"))
    return replace(base, train=train,
                   ray=RayParams(**{"storage_path": str(tmp / "ray"), "max_failures": 1, **ray}))


def _curve(path: Path) -> dict[int, float]:
    with path.open() as fh:
        return {int(row["step"]): float(row["loss"]) for row in csv.DictReader(fh)}


def _workers() -> dict[str, str]:
    from ray.util.state import list_actors

    return {a.actor_id: a.node_id
            for a in list_actors(filters=[("class_name", "=", "RayTrainWorker")], limit=1000)}


@pytest.fixture(scope="module")
def two_node_run(ray_cluster, tiny_run, tmp_path_factory):
    """Both phases with two workers forced onto different nodes (STRICT_SPREAD)."""
    tmp = tmp_path_factory.mktemp("ray2")
    params = _ray_params(tiny_run, tmp, num_workers=2, placement_strategy="STRICT_SPREAD")
    before = set(_workers())
    train_ray(params, 1)
    phase1_workers = {k: v for k, v in _workers().items() if k not in before}
    train_ray(params, 2)
    return params, phase1_workers


def test_two_workers_on_two_nodes_train_both_phases(two_node_run, ray_cluster):
    params, workers = two_node_run
    assert len(workers) == 2 and len(set(workers.values())) == 2  # one worker per node
    nodes = {n["NodeID"] for n in ray.nodes() if n["Alive"]}
    assert set(workers.values()) <= nodes
    for phase in (1, 2):
        config = json.loads((params.train.phase_out(phase) / "config.json").read_text())
        assert config["steps"] == 30 and config["run"].startswith(f"train_phase{phase}-")
        assert (params.train.phase_out(phase) / "model.safetensors").exists()
        curve = _curve(Path(params.train.curves) / f"phase{phase}_curve.csv")
        assert max(curve) == 30
    # keep_checkpoints=2: only the last two checkpoints remain in storage
    run = Path(params.ray.storage_path) / run_name(params, 2, workers=2)
    assert sorted(p.relative_to(run).as_posix() for p in run.glob("attempt-*/step-*")) == [
        "attempt-001/step-0000020", "attempt-001/step-0000030"]


def test_rerun_of_a_finished_run_exports_without_training(two_node_run):
    params, _ = two_node_run
    out = params.train.phase_out(2)
    before = load_file(out / "model.safetensors")
    (out / "model.safetensors").unlink()
    train_ray(params, 2)
    after = load_file(out / "model.safetensors")
    assert all(torch.equal(before[k], after[k]) for k in before)


def test_worker_death_resumes_from_s3_checkpoint(two_node_run, s3_server, tmp_path):
    """Rank 1 exits hard at step 15; the group restarts from the step-10 checkpoint in S3
    and ends where the uninterrupted run ended."""
    clean, _ = two_node_run
    s3 = boto3.client("s3", endpoint_url=s3_server)
    s3.create_bucket(Bucket="ckpt")
    params = _ray_params(clean, tmp_path, num_workers=2, storage_path="s3://ckpt/runs",
                         storage_endpoint=s3_server)
    fault = Fault(step=15, marker=str(tmp_path / "fault-fired"), rank=1)
    train_ray(params, 1, fault=fault)
    assert Path(fault.marker).exists()
    config = json.loads((params.train.phase_out(1) / "config.json").read_text())
    assert config["steps"] == 30 and config["resumed_at"] == [10]
    ours = load_file(params.train.phase_out(1) / "model.safetensors")
    theirs = load_file(clean.train.phase_out(1) / "model.safetensors")
    for key in ours:
        torch.testing.assert_close(ours[key], theirs[key], rtol=1e-4, atol=1e-5)
    keys = [o["Key"] for o in s3.list_objects_v2(Bucket="ckpt", Prefix="runs/")["Contents"]]
    states = sorted(k for k in keys if k.endswith("/state.pt"))
    assert [k.split("/")[-2] for k in states] == ["step-0000020", "step-0000030"]
    for key in states:  # every stored checkpoint loads, and matches its manifest
        body = s3.get_object(Bucket="ckpt", Key=key)["Body"].read()
        manifest = s3.get_object(Bucket="ckpt", Key=key.replace("state.pt", "manifest.json"))
        assert json.loads(manifest["Body"].read())["bytes"] == len(body)
        assert torch.load(io.BytesIO(body), weights_only=True)["phase"] == 1


def test_one_worker_matches_the_single_process_loop(ray_cluster, tiny_runs, tmp_path):
    """A family other than DAE-Fuse (no discriminators): Ray Train with one worker and the
    local loop give the same curve."""
    params = _ray_params(tiny_runs["cddfuse"], tmp_path, num_workers=1)
    train_ray(params, 1)
    ray_curve = _curve(tmp_path / "reports" / "phase1_curve.csv")
    local_curve = _curve(Path(tiny_runs["cddfuse"].train.curves) / "phase1_curve.csv")
    assert ray_curve.keys() == local_curve.keys()
    np.testing.assert_allclose(list(ray_curve.values()), list(local_curve.values()), rtol=1e-4)


def test_storage_paths(tmp_path, monkeypatch):
    base = Params(ray=RayParams(storage_path="s3://bucket/some/prefix/",
                                storage_endpoint="http://127.0.0.1:9000"))
    path, fs = storage(base)
    assert path == "bucket/some/prefix" and fs.type_name == "s3"
    local = Params(ray=RayParams(storage_path=str(tmp_path / "ck")))
    assert storage(local)[0] == str(tmp_path / "ck") and storage(local)[1].type_name == "local"
    with pytest.raises(FusionError, match="gs://b"):
        storage(Params(ray=RayParams(storage_path="gs://b/x")))


def test_run_name_hashes_the_worker_count(tiny_run):
    names = {run_name(tiny_run, 1), run_name(tiny_run, 1, workers=1),
             run_name(tiny_run, 1, workers=2), run_name(tiny_run, 2, workers=2)}
    assert len(names) == 4
    assert run_name(tiny_run, 1, workers=2) == run_name(tiny_run, 1, workers=2)
