"""The real dvc CLI in fresh clone-like copies of the repo: stages, cache, S3 remote.
(The whole pipeline under `dvc repro` is tested through the retrain flow: test_flows.py.)"""

import shutil

import boto3
import pyarrow.parquet as pq

from tests.conftest import clone_repo as _clone
from tests.conftest import run_cmd as _run


def test_dvc_repro_prepare_runs_then_is_cached(tmp_path):
    repo = _clone(tmp_path)
    out = _run("dvc", "repro", "prepare", cwd=repo)
    assert "Running stage 'prepare'" in out
    manifest = pq.read_table(repo / "data/prepared/manifest.parquet").to_pylist()
    assert {r["split"] for r in manifest} == {"train", "val", "test"}
    _run("git", "check-ignore", "data/prepared", cwd=repo)  # a DVC output, ignored by git
    again = _run("dvc", "repro", "prepare", cwd=repo)
    assert "didn't change, skipping" in again
    metrics = _run("dvc", "metrics", "show", "--json", cwd=repo)
    assert '"pairs"' in metrics
    _run("dvc", "push", "-r", "local", cwd=repo)  # the default local remote works as configured


def test_dvc_remote_on_s3_push_then_pull_in_a_clean_clone(tmp_path, s3_server):
    boto3.client("s3", endpoint_url=s3_server).create_bucket(Bucket="dvc-store")
    first = _clone(tmp_path / "first")
    _run("dvc", "repro", "prepare", cwd=first)
    for repo in (first, _clone(tmp_path / "second")):
        _run("dvc", "remote", "add", "-d", "s3store", "s3://dvc-store/fusion", cwd=repo)
        _run("dvc", "remote", "modify", "s3store", "endpointurl", s3_server, cwd=repo)
    _run("dvc", "push", cwd=first)
    second = tmp_path / "second" / "repo"
    shutil.copy2(first / "dvc.lock", second / "dvc.lock")  # as `git pull` would bring it
    _run("dvc", "pull", "prepare", cwd=second)
    ours = sorted(p.relative_to(first) for p in (first / "data/prepared").rglob("*")
                  if p.is_file())
    assert ours and ours == sorted(p.relative_to(second)
                                   for p in (second / "data/prepared").rglob("*") if p.is_file())
    for rel in ours:
        assert (first / rel).read_bytes() == (second / rel).read_bytes()
