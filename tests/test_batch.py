"""`fusion fuse --ray` on the session's two-node Ray cluster with the pairs in S3 (moto):
the outputs equal folder-mode `fuse`, a worker node killed mid-run costs no finished pair
and no pair is fused twice after the restart, and a stem two files share is refused."""

from __future__ import annotations

import hashlib
import os
import subprocess
import sys
import time
from pathlib import Path

import boto3
import numpy as np
import pyarrow.parquet as pq
from PIL import Image

from tests.conftest import RAY_GROUP, REPO, run_cli

SAMPLE = REPO / "data/sample/roadscene"
COPIES = 3  # the sample's pairs under 3 names each: a run long enough to kill mid-way


def _upload(s3_url: str, bucket: str) -> list[str]:
    client = boto3.client("s3", endpoint_url=s3_url)
    client.create_bucket(Bucket=bucket)
    stems = []
    for copy in range(COPIES):
        for ir in sorted((SAMPLE / "ir").iterdir()):
            stem = f"{ir.stem}-{copy}"
            for side in ("ir", "vi"):
                client.upload_file(str(SAMPLE / side / ir.name), bucket,
                                   f"in/{side}/{stem}{ir.suffix}")
            stems.append(stem)
    return stems


def _env(ray_cluster, s3_url: str) -> dict:
    return {"RAY_ADDRESS": ray_cluster.address, "AWS_ENDPOINT_URL": s3_url}


def _fuse_ray(onnx: Path, bucket: str, *extra: str) -> list[str]:
    return ["fuse", "--ray", "--model", str(onnx), "--a", f"s3://{bucket}/in/ir", "--b",
            f"s3://{bucket}/in/vi", "-o", f"s3://{bucket}/out", "--set", "batch.workers=2",
            "--set", "batch.cpus_per_worker=2", "--set", "batch.pairs_per_batch=1", *extra]


def _outputs(s3_url: str, bucket: str) -> list[str]:
    listing = boto3.client("s3", endpoint_url=s3_url).list_objects_v2(Bucket=bucket,
                                                                         Prefix="out/")
    return [o["Key"] for o in listing.get("Contents", []) if o["Key"].endswith(".png")]


@RAY_GROUP
def test_batch_fusion_resumes_after_a_lost_node_and_equals_folder_mode(
        ray_cluster, s3_server, tiny_run, tmp_path):
    onnx = tmp_path / "model.onnx"
    done = run_cli("export", "--model", str(tiny_run.train.phase_out(2)), "--onnx", str(onnx),
                   cwd=tmp_path)
    assert done.returncode == 0, done.stderr
    stems = _upload(s3_server, "batch")
    env = {**os.environ, **_env(ray_cluster, s3_server), "FUSION_QUIET": "1"}
    first = subprocess.Popen([sys.executable, "-m", "fusion.cli", *_fuse_ray(onnx, "batch")],
                             cwd=tmp_path, env=env, stdout=subprocess.PIPE,
                             stderr=subprocess.PIPE, text=True)
    deadline = time.time() + 240
    while len(_outputs(s3_server, "batch")) < 6 and time.time() < deadline:
        assert first.poll() is None, first.communicate()
        time.sleep(0.2)
    ray_cluster.kill_worker()  # kill -9 the worker node mid-run
    ray_cluster.add_worker()  # a replacement joins, as the autoscaler or KubeRay would add
    _, err = first.communicate(timeout=300)
    assert first.returncode in (0, 75), err  # finished on the replacement, or gave up
    second = run_cli(*_fuse_ray(onnx, "batch"), cwd=tmp_path, env=_env(ray_cluster, s3_server),
                     timeout=300)
    assert second.returncode == 0, second.stderr

    client = boto3.client("s3", endpoint_url=s3_server)
    parts = [o["Key"] for o in client.list_objects_v2(Bucket="batch", Prefix="out/manifest/")
             ["Contents"] if o["Key"].endswith(".parquet")]
    rows = []
    for key in parts:
        path = tmp_path / Path(key).name
        client.download_file("batch", key, str(path))
        rows += pq.read_table(path).to_pylist()
    pairs = [row["pair"] for row in rows]
    assert sorted(pairs) == sorted(stems)  # every pair recorded, and recorded once
    assert 1 <= len({row["run"] for row in rows}) <= 2  # the rerun fused only the rest

    local = run_cli("fuse", "--engine", "onnxruntime", "--model", str(onnx), "--a",
                    str(SAMPLE / "ir"), "--b", str(SAMPLE / "vi"), "-o", str(tmp_path / "local"),
                    cwd=tmp_path)
    assert local.returncode == 0, local.stderr
    refused = run_cli("fuse", "--engine", "onnxruntime", "--precision", "bf16", "--model",
                      str(onnx), "--a", str(SAMPLE / "ir"), "--b", str(SAMPLE / "vi"), "-o",
                      str(tmp_path / "bf16"), cwd=tmp_path)
    assert refused.returncode == 2 and "--precision is torch's" in refused.stderr
    assert not (tmp_path / "bf16").exists()
    for row in rows[:: len(rows) // 6]:
        path = tmp_path / row["output"]
        client.download_file("batch", f"out/{row['output']}", str(path))
        ours = np.asarray(Image.open(path))
        original = row["pair"].rsplit("-", 1)[0]
        theirs = np.asarray(Image.open(tmp_path / "local" / f"{original}.png"))
        # the same engine and model: equal but for onnxruntime's multi-threaded float sums,
        # which can flip a value at .5 when rounded to 8 bits (3 of 500 000 seen)
        diff = np.abs(ours.astype(int) - theirs)
        assert diff.max() <= 1 and (diff > 0).mean() < 1e-4, (row["pair"], diff.max())
        assert hashlib.sha256(path.read_bytes()).hexdigest() == row["output_sha256"]


def test_a_stem_two_s3_files_share_is_refused(s3_server, tiny_run, tmp_path):
    """Refused while listing, before a model loads or Ray starts."""
    client = boto3.client("s3", endpoint_url=s3_server)
    client.create_bucket(Bucket="dup")
    for side in ("ir", "vi"):
        client.upload_file(str(SAMPLE / side / "FLIR_00006.jpg"), "dup", f"in/{side}/x.jpg")
    client.upload_file(str(SAMPLE / "ir" / "FLIR_00018.jpg"), "dup", "in/ir/x.png")
    run = run_cli(*_fuse_ray(Path(tiny_run.train.phase_out(2)), "dup"), cwd=tmp_path,
                  env={"AWS_ENDPOINT_URL": s3_server, "RAY_ADDRESS": "127.0.0.1:1"})
    assert run.returncode == 2, run.stderr
    assert "s3://dup/in/ir: ambiguous: several files with stem 'x' (x.jpg, x.png)" in run.stderr
    assert run.stderr.count("\n") == 1
    assert not _outputs(s3_server, "dup")
