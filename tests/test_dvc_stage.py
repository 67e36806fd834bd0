"""`dvc repro prepare` with the real dvc CLI, in a fresh git clone-like copy of the repo."""

import shutil
import subprocess
from pathlib import Path

import pyarrow.parquet as pq

from tests.conftest import REPO


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
