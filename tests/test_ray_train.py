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
from fusion.engine.fingerprints import run_name
from fusion.engine.ray_runner import Fault, train_ray
from fusion.errors import FusionError
from fusion.params import Params, RayParams
from tests.conftest import RAY_GROUP

pytestmark = RAY_GROUP


def _ray_params(base: Params, tmp: Path, **ray) -> Params:
    """``base`` (its prepared data) with outputs under ``tmp`` and the given Ray settings."""
    train = replace(base.train, out=str(tmp / "models"), curves=str(tmp / "reports"))
    return replace(base, train=train,
                   ray=RayParams(**{"storage_path": str(tmp / "ray"), "max_failures": 1,
                                     "cpus_per_worker": 1.0, **ray}))


def _curve(path: Path) -> dict[int, float]:
    with path.open() as fh:
        return {int(row["step"]): float(row["loss"]) for row in csv.DictReader(fh)}


def _workers() -> dict[str, str]:
    from ray.util.state import list_actors

    return {a.actor_id: a.node_id
            for a in list_actors(filters=[("class_name", "=", "RayTrainWorker")], limit=1000)}


@pytest.fixture(scope="module")
def two_node_run(ray_cluster, tiny_run, tmp_path_factory):
    """DAE-Fuse phase 1 (generator and discriminators under DDP) with two workers forced
    onto different nodes (STRICT_SPREAD). Phase 2 on Ray runs in the flow tests."""
    tmp = tmp_path_factory.mktemp("ray2")
    params = _ray_params(tiny_run, tmp, num_workers=2, placement_strategy="STRICT_SPREAD")
    before = set(_workers())
    train_ray(params, 1)
    phase1_workers = {k: v for k, v in _workers().items() if k not in before}
    return params, phase1_workers


def test_two_workers_on_two_nodes_train_phase_1(two_node_run, ray_cluster):
    params, workers = two_node_run
    assert len(workers) == 2 and len(set(workers.values())) == 2  # one worker per node
    nodes = {n["NodeID"] for n in ray.nodes() if n["Alive"]}
    assert set(workers.values()) <= nodes
    config = json.loads((params.train.phase_out(1) / "config.json").read_text())
    assert config["steps"] == 30 and config["run"].startswith("train_phase1-")
    assert (params.train.phase_out(1) / "model.safetensors").exists()
    assert max(_curve(Path(params.train.curves) / "phase1_curve.csv")) == 30
    # keep_checkpoints=2: only the last two checkpoints remain in storage
    run = Path(params.ray.storage_path) / run_name(params, 1, workers=2)
    assert sorted(p.relative_to(run).as_posix() for p in run.glob("attempt-*/step-*")) == [
        "attempt-001/step-0000020", "attempt-001/step-0000030"]


def test_rerun_of_a_finished_run_exports_without_training(two_node_run):
    params, _ = two_node_run
    out = params.train.phase_out(1)
    before = load_file(out / "model.safetensors")
    (out / "model.safetensors").unlink()
    train_ray(params, 1)
    after = load_file(out / "model.safetensors")
    assert all(torch.equal(before[k], after[k]) for k in before)


@pytest.fixture(scope="module")
def one_worker_run(ray_cluster, tiny_runs, s3, tmp_path_factory):
    """CDDFuse (no discriminators) phase 1 on Ray Train with one worker and checkpoints in
    S3; the worker exits hard at step 15, so the group restarts from the step-10
    checkpoint, and S3 answers every request with 503 SlowDown for 4 s from the first
    upload of the step-20 state file on. (One run serves the restart, the S3 outage, the
    equality and the corrupt-checkpoint tests: a Ray Train run costs about a minute of
    start-up here.)"""
    tmp = tmp_path_factory.mktemp("ray1")
    boto3.client("s3", endpoint_url=s3.url).create_bucket(Bucket="ckpt")
    params = _ray_params(tiny_runs["cddfuse"], tmp, num_workers=1,
                         storage_path="s3://ckpt/runs", storage_endpoint=s3.url)
    fault = Fault(step=15, marker=str(tmp / "fault-fired"), rank=0)
    s3.outage("/step-0000020/state.pt", seconds=4)
    train_ray(params, 1, fault=fault)
    assert Path(fault.marker).exists()
    return params, list(s3.failed)


def test_worker_death_resumes_from_s3_checkpoint(one_worker_run, s3_server):
    """The worker died at step 15; the restarted group resumed from the step-10 checkpoint
    in S3 and finished at the configured step, and every stored checkpoint verifies."""
    params, _ = one_worker_run
    config = json.loads((params.train.phase_out(1) / "config.json").read_text())
    assert config["steps"] == 30 and config["resumed_at"] == [10]
    s3 = boto3.client("s3", endpoint_url=s3_server)
    keys = [o["Key"] for o in s3.list_objects_v2(Bucket="ckpt", Prefix="runs/")["Contents"]]
    states = sorted(k for k in keys if k.endswith("/state.pt"))
    assert [k.split("/")[-2] for k in states] == ["step-0000020", "step-0000030"]
    for key in states:  # every stored checkpoint loads, and matches its manifest
        body = s3.get_object(Bucket="ckpt", Key=key)["Body"].read()
        manifest = s3.get_object(Bucket="ckpt", Key=key.replace("state.pt", "manifest.json"))
        assert json.loads(manifest["Body"].read())["bytes"] == len(body)
        assert torch.load(io.BytesIO(body), weights_only=True)["phase"] == 1


def test_a_checkpoint_write_outlives_an_s3_outage(one_worker_run):
    """S3 refused the step-20 checkpoint's uploads (503 for 4 s, from its state file on):
    the worker's copy of the store retried them (pyarrow's pickling dropped the retry
    strategy, and such a write failed after 0.3 s), so no restart was spent on it and the
    checkpoint verifies (above)."""
    params, failed = one_worker_run
    assert failed and failed[0].endswith("/step-0000020/state.pt"), failed
    config = json.loads((params.train.phase_out(1) / "config.json").read_text())
    assert config["resumed_at"] == [10]  # the one restart is the injected worker death


def test_resumed_ray_run_equals_the_single_process_loop_on_the_same_input(one_worker_run):
    """The local loop fed the same Ray Data shard (one split, seeded shuffles), never
    interrupted, gives the curve and the weights of the Ray Train run that lost its worker
    at step 15: one loop, Ray or not, and a resumed run reproduces its seed."""
    import ray.data

    from fusion.data.prepared import source
    from fusion.engine.batches import ShardBatches
    from fusion.engine.cluster import read_patches
    from fusion.engine.trainer import Trainer

    params, _ = one_worker_run
    src = source(params.train.data)
    size, rows = src.layout("train")
    ds = read_patches(src)
    ray.data.DataContext.get_current().execution_options.preserve_order = True
    (shard,) = ds.streaming_split(1, equal=True)
    t = params.train
    batches = ShardBatches(shard, t.batch_size, t.seed, t.crop, size, rows, 1)
    threads = torch.get_num_threads()
    torch.set_num_threads(int(params.ray.cpus_per_worker))  # as the Ray worker ran
    try:
        trainer = Trainer(params, 1)
        trainer.fit(batches.batch)
    finally:
        torch.set_num_threads(threads)
    ray_curve = _curve(Path(t.curves) / "phase1_curve.csv")
    local_curve = {int(r["step"]): r["loss"] for r in trainer.curve}
    assert ray_curve.keys() == local_curve.keys() == set(range(5, 31, 5))
    # float noise only (seen: 1e-4 relative on a loss, 4e-5 on a weight); one Adam step
    # moves a weight by about lr = 2e-3, so a lost or repeated step fails these bounds
    np.testing.assert_allclose(list(ray_curve.values()), list(local_curve.values()), rtol=1e-3)
    ours = load_file(params.train.phase_out(1) / "model.safetensors")
    local = trainer.weights_cpu()[0]
    for key in ours:
        torch.testing.assert_close(ours[key], local[key], rtol=1e-3, atol=2e-4)


def test_a_corrupt_newest_checkpoint_is_skipped(one_worker_run, tmp_path, capsys):
    """Copy the finished run's checkpoints out of S3, truncate the final one and rerun: the
    driver warns, naming it, resumes from the one before (a new attempt; Ray's own run
    snapshot is never needed) and ends with the same weights."""
    import pyarrow.fs as pafs

    first, _ = one_worker_run
    src_root, src_fs = storage(first)
    params = _ray_params(first, tmp_path, num_workers=1)
    pafs.copy_files(src_root, params.ray.storage_path, source_filesystem=src_fs,
                    destination_filesystem=pafs.LocalFileSystem())
    run = Path(params.ray.storage_path) / run_name(params, 1, workers=1)
    final = next(run.glob("attempt-*/step-0000030"))
    state = final / "state.pt"
    state.write_bytes(state.read_bytes()[: state.stat().st_size // 2])
    capsys.readouterr()
    train_ray(params, 1)
    err = capsys.readouterr().err
    assert f"warning: skipping checkpoint {final}" in err and "state.pt has" in err
    ours = load_file(params.train.phase_out(1) / "model.safetensors")
    theirs = load_file(first.train.phase_out(1) / "model.safetensors")
    for key in ours:
        torch.testing.assert_close(ours[key], theirs[key], rtol=1e-4, atol=1e-5)
    assert sorted(p.name for p in run.iterdir()) == ["attempt-002"]  # the older one pruned


def test_no_patch_twice_in_an_epoch_per_worker(ray_cluster, tiny_run):
    """Two workers' shards of one epoch are disjoint and without repeats, and cover every
    patch but the remainder Ray Data drops to keep the split equal."""
    import threading

    from fusion.data.prepared import source
    from fusion.engine.cluster import read_patches

    src = source(tiny_run.train.data)
    _, rows = src.layout("train")
    ds = read_patches(src, ["pair_id", "y", "x"])
    shards = ds.streaming_split(2, equal=True)
    seen: list[list[tuple]] = [[], []]

    def consume(i: int) -> None:
        for batch in shards[i].iter_batches(batch_size=4, batch_format="numpy",
                                            local_shuffle_buffer_size=16,
                                            local_shuffle_seed=7):
            seen[i] += list(zip(batch["pair_id"], batch["y"], batch["x"], strict=True))

    threads = [threading.Thread(target=consume, args=(i,)) for i in range(2)]
    for th in threads:
        th.start()
    for th in threads:
        th.join()
    assert all(len(s) == len(set(s)) for s in seen)
    assert not set(seen[0]) & set(seen[1])
    assert len(seen[0]) == len(seen[1]) == rows // 2


def test_storage_paths(tmp_path, monkeypatch):
    base = Params(ray=RayParams(storage_path="s3://bucket/some/prefix/",
                                storage_endpoint="http://127.0.0.1:9000"))
    path, fs = storage(base)
    assert path == "bucket/some/prefix" and fs.type_name == "s3"
    local = Params(ray=RayParams(storage_path=str(tmp_path / "ck")))
    assert storage(local)[0] == str(tmp_path / "ck") and storage(local)[1].type_name == "local"
    with pytest.raises(FusionError, match="gs://b"):
        storage(Params(ray=RayParams(storage_path="gs://b/x")))


def test_a_shipped_s3_store_keeps_retrying_through_an_outage(s3):
    """The store as Ray ships it to a worker (pickled) still retries: a write begun during
    a 2-second 503 outage lands. (pyarrow's own pickling dropped the retry strategy: 3
    attempts, failed in 0.3 s.)"""
    import pickle

    boto3.client("s3", endpoint_url=s3.url).create_bucket(Bucket="shipped")
    _, fs = storage(Params(ray=RayParams(storage_path="s3://shipped/x",
                                         storage_endpoint=s3.url)))
    shipped = pickle.loads(pickle.dumps(fs))
    s3.outage("/shipped/x/", seconds=2)
    with shipped.open_output_stream("shipped/x/blob") as out:
        out.write(b"checkpoint bytes")
    assert s3.failed and shipped.open_input_stream("shipped/x/blob").read() == b"checkpoint bytes"


def test_shipped_params_carry_the_s3_endpoint(monkeypatch, tmp_path):
    """Workers and trials get the endpoint this process resolved: a node started without
    $AWS_ENDPOINT_URL looked for the bucket on AWS (found by the production-stack test)."""
    from fusion.engine.cluster import shipped

    monkeypatch.setenv("AWS_ENDPOINT_URL", "http://127.0.0.1:9")
    monkeypatch.chdir(tmp_path)
    base = Params(ray=RayParams(storage_path="s3://b/x"))
    out = shipped(base)
    assert out.ray.storage_endpoint == "http://127.0.0.1:9"
    assert out.train.data == str(tmp_path / base.train.data)
    explicit = Params(ray=RayParams(storage_endpoint="http://127.0.0.1:10"))
    assert shipped(explicit).ray.storage_endpoint == "http://127.0.0.1:10"


def test_run_name_hashes_the_worker_count(tiny_run):
    names = {run_name(tiny_run, 1), run_name(tiny_run, 1, workers=1),
             run_name(tiny_run, 1, workers=2), run_name(tiny_run, 2, workers=2)}
    assert len(names) == 4
    assert run_name(tiny_run, 1, workers=2) == run_name(tiny_run, 1, workers=2)


def test_publish_copies_the_prepared_dataset_to_s3_once(prepared, s3_server):
    """`fusion train` with train.data on S3 publishes data.out there; the same dataset is not
    copied twice, and shards the dataset no longer has are removed."""
    from fusion.data.prepared import publish, source

    boto3.client("s3", endpoint_url=s3_server).create_bucket(Bucket="publish")
    uri = "s3://publish/prepared"
    shards = sorted(p.name for p in (prepared / "patches").glob("*.parquet"))
    assert publish(prepared, uri, s3_server) == len(shards) + 1
    assert publish(prepared, uri, s3_server) == 0  # same manifest: nothing copied
    remote = source(uri, s3_server)
    assert [Path(p).name for p in remote.files("train")] == [s for s in shards if "train" in s]
    assert remote.layout("train") == source(str(prepared)).layout("train")
    s3 = boto3.client("s3", endpoint_url=s3_server)
    s3.put_object(Bucket="publish", Key="prepared/patches/train-99999.parquet", Body=b"old")
    s3.put_object(Bucket="publish", Key="prepared/manifest.parquet", Body=b"older dataset")
    assert publish(prepared, uri, s3_server) == len(shards) + 1
    assert "train-99999.parquet" not in {Path(p).name for p in remote.files("train")}


def test_a_killed_worker_node_is_replaced_and_the_run_resumes_from_s3(ray_cluster, tiny_run,
                                                                      s3, tmp_path):
    """kill -9 the worker node (raylet, object store, its training worker) once the run's
    step-10 checkpoint is in S3, then start a replacement node, as an autoscaler would: the
    two-node run (STRICT_SPREAD) waits for it, resumes from the newest S3 checkpoint and
    finishes every step."""
    import time
    from concurrent.futures import ThreadPoolExecutor

    client = boto3.client("s3", endpoint_url=s3.url)
    client.create_bucket(Bucket="nodekill")
    params = _ray_params(tiny_run, tmp_path, num_workers=2, placement_strategy="STRICT_SPREAD",
                         storage_path="s3://nodekill/runs", storage_endpoint=s3.url)
    params = replace(params, train=replace(params.train, steps=[80, 30]))
    before = set(_workers())
    with ThreadPoolExecutor(1) as pool:
        driver = pool.submit(train_ray, params, 1)
        deadline = time.time() + 300
        while not any(o["Key"].endswith("/manifest.json") for o in client.list_objects_v2(
                Bucket="nodekill", Prefix="runs/").get("Contents", [])):
            assert not driver.done() and time.time() < deadline, "no checkpoint reached S3"
            time.sleep(0.1)
        ray_cluster.kill_worker()
        ray_cluster.add_worker()
        driver.result(timeout=600)
    config = json.loads((params.train.phase_out(1) / "config.json").read_text())
    assert config["steps"] == 80 and len(config["resumed_at"]) == 1
    assert config["resumed_at"][0] % 10 == 0 and 10 <= config["resumed_at"][0] < 80
    assert max(_curve(Path(params.train.curves) / "phase1_curve.csv")) == 80
    workers = {k: v for k, v in _workers().items() if k not in before}
    alive = {n["NodeID"] for n in ray.nodes() if n["Alive"]}
    assert len(workers) == 4 and len(set(workers.values())) == 3  # head, killed, replacement
    assert len(set(workers.values()) & alive) == 2


def test_training_data_outlives_a_minute_long_s3_stop(ray_cluster, tiny_run, s3, tmp_path):
    """The patch shards live only in S3 (train.data = s3://). Once the run is past step
    50, the S3 server stops for a minute; the second epoch's read (from step 115 on)
    starts inside that minute. The readers wait and retry (pyarrow's retries inside Ray
    Data's), the run completes without a restart, and no step is lost."""
    import threading
    import time

    from fusion.data.prepared import publish

    boto3.client("s3", endpoint_url=s3.url).create_bucket(Bucket="drill")
    publish(tiny_run.train.data, "s3://drill/prepared", s3.url)
    params = _ray_params(tiny_run, tmp_path, num_workers=1, storage_endpoint=s3.url)
    train = replace(params.train, data="s3://drill/prepared", steps=[130, 30], batch_size=8,
                    checkpoint_every=25)
    params = replace(params, train=train)
    per_epoch = 922 // train.batch_size  # the sample's training patches, one worker
    assert 50 < per_epoch < 130
    failure: list[BaseException] = []

    def driver() -> None:
        try:
            train_ray(params, 1)
        except BaseException as exc:  # noqa: BLE001 (re-raised in the test thread)
            failure.append(exc)

    run = threading.Thread(target=driver)
    run.start()
    deadline = time.time() + 300
    while not list(Path(params.ray.storage_path).glob("*/attempt-*/step-0000050/manifest.json")):
        assert run.is_alive() and time.time() < deadline, failure or "no step-50 checkpoint"
        time.sleep(0.05)
    stopped = time.time()
    s3.down(60)
    back = time.time()
    run.join(timeout=600)
    assert not run.is_alive() and not failure, failure
    config = json.loads((params.train.phase_out(1) / "config.json").read_text())
    assert config["steps"] == 130 and config["resumed_at"] == []  # the readers waited
    with (Path(params.train.curves) / "phase1_curve.csv").open() as fh:
        times = {int(row["step"]): float(row["time"]) for row in csv.DictReader(fh)}
    assert sorted(times) == list(range(5, 131, 5))  # every step trained, once
    # the stall is at the epoch boundary: the second epoch's shard read waited for S3
    gaps = {step: times[step] - times[step - 5] for step in times if step > 5}
    stalled = max(gaps, key=gaps.get)
    print(f"S3 stopped at {stopped - times[5]:.1f} s, back at {back - times[5]:.1f} s; "
          f"stall of {gaps[stalled]:.1f} s after step {stalled - 5}")
    assert stalled - 5 <= per_epoch < stalled and gaps[stalled] > 20, gaps
    assert times[stalled - 5] < back < times[stalled], (stopped, back, times)
    shard = [t for t, r in s3.requests if r.startswith("GET /drill/prepared/patches/train-")]
    assert any(t > back for t in shard)  # read again once S3 was back
