"""The real dvc CLI in fresh clone-like copies of the repo: stages, cache, S3 remote."""

import json
import shutil
import subprocess
from pathlib import Path

import boto3
import pyarrow.parquet as pq
import yaml

from tests.conftest import REPO, TINY_MODEL


def _run(*cmd: str, cwd: Path) -> str:
    done = subprocess.run(cmd, cwd=cwd, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, f"{cmd}: {done.stdout}\n{done.stderr}"
    return done.stdout


def _clone(tmp_path: Path) -> Path:
    """Copy the tracked + untracked-not-ignored files, as a fresh clone would have them."""
    files = _run("git", "ls-files", "-z", "--cached", "--others", "--exclude-standard",
                 cwd=REPO).split("\0")
    dest = tmp_path / "repo"
    for name in filter(None, files):
        if (REPO / name).is_file():
            (dest / name).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(REPO / name, dest / name)
    _run("git", "init", "-q", cwd=dest)
    return dest


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


def test_full_pipeline_repro_is_cached_and_reruns_only_downstream(tmp_path, ray_cluster):
    """prepare -> train_phase1/2 (Ray Train, on the session cluster) -> evaluate -> register
    with a tiny config; then nothing to do; then one phase II weight reruns from phase II."""
    repo = _clone(tmp_path)
    params = yaml.safe_load((repo / "params.yaml").read_text())
    params["data"].update(patch_size=48, stride=48)
    params["model"].update(TINY_MODEL)
    params["train"].update(phase1_steps=10, phase2_steps=10, batch_size=4, log_every=5,
                           checkpoint_every=5)
    params["ray"].update(address=ray_cluster.address, cpus_per_worker=1.0)
    params["evaluate"]["sets"] = params["evaluate"]["sets"][:1]
    (repo / "params.yaml").write_text(yaml.safe_dump(params, sort_keys=False))
    out = _run("dvc", "repro", cwd=repo)
    for stage in ("prepare", "train_phase1", "train_phase2", "evaluate", "register"):
        assert f"Running stage '{stage}'" in out
    record = json.loads((repo / "reports/registered.json").read_text())
    assert record["version"] == "1" and record["tracking_uri"] == "sqlite:///mlflow.db"
    assert "Data and pipelines are up to date" in _run("dvc", "repro", cwd=repo)
    assert "tno" in _run("dvc", "metrics", "show", cwd=repo)
    _run("dvc", "plots", "show", "-o", str(tmp_path / "plots"), cwd=repo)
    assert (tmp_path / "plots" / "index.html").exists()
    params["loss"]["w_text"] = 2.0
    (repo / "params.yaml").write_text(yaml.safe_dump(params, sort_keys=False))
    dry = _run("dvc", "repro", "--dry", cwd=repo)
    assert "Running stage 'train_phase2'" in dry
    assert "Running stage 'prepare'" not in dry and "Running stage 'train_phase1'" not in dry
