import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from fusion.evaluation.scoring import read_grey, score_folders
from tests.conftest import REPO, save, textured


def _sets(tmp_path: Path) -> tuple[Path, Path, Path]:
    a_dir, b_dir, f_dir = tmp_path / "ir", tmp_path / "vi", tmp_path / "fused"
    for i, stem in enumerate(["p1", "p2", "p3", "p4"]):
        a, b = textured(64, 80, i), textured(64, 80, 10 + i, rgb=True)
        save(a_dir / f"{stem}.jpg", a)
        save(b_dir / f"{stem}.jpg", b)
    save(f_dir / "p1.png", textured(64, 80, 20))
    save(f_dir / "p2.png", np.full((64, 80), 3, np.uint8))  # constant: defined values
    save(f_dir / "p3.png", textured(60, 80, 21))  # wrong size
    return f_dir, a_dir, b_dir  # p4 has no fused image


def test_score_reports_bad_files_and_scores_the_rest(tmp_path):
    report = score_folders(*_sets(tmp_path))
    assert sorted(report.per_image) == ["p1.png", "p2.png"]
    assert all(np.isfinite(list(v.values())).all() for v in report.per_image.values())
    joined = "\n".join(report.errors)
    assert "p3.png: size 80x60 differs from its sources (80x64)" in joined
    assert "p4.*: fused image missing" in joined


def test_rgb_sources_read_like_the_published_evaluator(tmp_path):
    rgb = textured(8, 8, 1, rgb=True)
    grey = read_grey(save(tmp_path / "x.png", rgb))
    expected = np.round(rgb[..., 0] * 0.299 + rgb[..., 1] * 0.587 + rgb[..., 2] * 0.114)
    assert np.abs(grey - expected).max() <= 1  # float rounding at exact .5 may differ
    assert (grey == expected).mean() > 0.95


def test_cli_table_json_and_exit_code(tmp_path):
    f_dir, a_dir, b_dir = _sets(tmp_path)
    out = tmp_path / "scores.json"
    run = subprocess.run([sys.executable, "-m", "fusion.cli", "score", "--fused", str(f_dir),
                          "--a", str(a_dir), "--b", str(b_dir), "--json", str(out)],
                         cwd=REPO, capture_output=True, text=True, timeout=300)
    assert run.returncode == 1, run.stderr  # some files could not be scored
    assert "| fused (n=2) |" in run.stdout and "Qabf" in run.stdout
    data = json.loads(out.read_text())
    assert set(data["images"]) == {"p1.png", "p2.png"}
    assert set(data["images"]["p1.png"]) >= {"EN", "SD", "SF", "MI", "SCD", "VIF", "Qabf",
                                             "SSIM", "AG", "PSNR", "CC", "MSE"}
    assert data["mean"]["EN"] == pytest.approx(
        (data["images"]["p1.png"]["EN"] + data["images"]["p2.png"]["EN"]) / 2)
    assert len(data["errors"]) == 2


def test_a_repeated_stem_is_reported_not_guessed(tmp_path):
    f_dir, a_dir, b_dir = _sets(tmp_path)
    save(a_dir / "p1.tif", textured(64, 80, 30))  # p1.jpg and p1.tif: which is source A?
    save(f_dir / "p1.tif", textured(64, 80, 31))  # and two fused images for p1
    report = score_folders(f_dir, a_dir, b_dir)
    assert "p1.png" not in report.per_image and "p2.png" in report.per_image
    joined = "\n".join(report.errors)
    assert "ir/p1.jpg: ambiguous: several files with stem 'p1' (p1.jpg, p1.tif)" in joined
    assert "vi/p1.jpg: its partner in ir/ is ambiguous" in joined
    assert "fused/p1.png: ambiguous: several files with stem 'p1'" in joined
