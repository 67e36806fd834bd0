import json
from pathlib import Path

import pyarrow.parquet as pq
import pytest
from PIL import Image

from tests.conftest import REPO, run_cli

SAMPLE = REPO / "data/sample"
SETS = ["--sets", f"tno={SAMPLE / 'tno/ir'}:{SAMPLE / 'tno/vi'}",
        "--sets", f"rs_test={SAMPLE / 'roadscene/ir'}:{SAMPLE / 'roadscene/vi'}:"
                  f"{SAMPLE / 'roadscene/test_split.txt'}"]


def _outputs(tmp: Path) -> list[str]:
    return ["--set", f"evaluate.out={tmp / 'eval'}", "--set", f"evaluate.summary={tmp / 'm'}",
            "--set", f"evaluate.grids={tmp / 'grids'}"]


def test_evaluate_puts_families_side_by_side_with_baselines(tiny_runs, tmp_path):
    """`fusion evaluate` with three models (one per family) and test sets given on the
    command line: one report, per-set metrics files that `dvc metrics show` prints as rows."""
    models = [str(tiny_runs[f].train.phase_out(2)) for f in ("dae-fuse", "cddfuse",
                                                             "mfdce-fuse")]
    run = run_cli("evaluate", *[x for m in models for x in ("--model", m)], *SETS,
                  *_outputs(tmp_path), cwd=tmp_path)
    assert run.returncode == 0, run.stderr
    summary = json.loads((tmp_path / "eval" / "summary.json").read_text())
    assert set(summary) == {"tno", "rs_test"}
    assert set(summary["tno"]) == {"model", "cddfuse:phase2", "mfdce-fuse:phase2", "mean", "max"}
    assert summary["tno"]["model"]["pairs"] == 2 and summary["rs_test"]["max"]["pairs"] == 3
    rows = pq.read_table(tmp_path / "eval" / "per_image.parquet").to_pylist()
    assert len(rows) == (2 + 3) * 5
    assert {r["image"] for r in rows if r["set"] == "rs_test"} == {
        "FLIR_00211", "FLIR_00977", "FLIR_01130"}
    assert sorted(p.name for p in (tmp_path / "m").iterdir()) == [
        "rs_test-max.json", "rs_test-mean.json", "rs_test.json", "tno-max.json",
        "tno-mean.json", "tno.json"]
    row = json.loads((tmp_path / "m" / "tno.json").read_text())
    assert set(row) == {"EN", "SD", "SF", "MI", "SCD", "VIF", "Qabf", "SSIM", "pairs"}
    assert row["SSIM"] == pytest.approx(summary["tno"]["model"]["SSIM"], abs=1e-4)
    report = (tmp_path / "eval" / "report.md").read_text()
    assert "| mean |" in report and "| cddfuse:phase2 |" in report
    assert "SSIM at most 2" in report and "without min-max stretching" in report
    grid = Image.open(tmp_path / "grids" / "tno.png")
    assert grid.width > 4 * grid.height / 2  # A | B | three models, two rows
    assert len(list((tmp_path / "eval" / "fused" / "model" / "tno").glob("*.png"))) == 2
    assert "| model |" in run.stdout


def test_evaluate_names_the_missing_folder_before_loading_a_model(tmp_path):
    run = run_cli("evaluate", "--model", str(tmp_path / "no-model"), "--sets",
                  f"ghost={tmp_path / 'nope_a'}:{tmp_path / 'nope_b'}", *_outputs(tmp_path),
                  cwd=tmp_path)
    assert run.returncode == 2
    assert "nope_a: folder not found" in run.stderr


def test_a_bad_sets_option_is_explained(capsys):
    from fusion.cli import main

    assert main(["evaluate", "--sets", "tno=only_one_dir"]) == 2
    assert "expected NAME=A_DIR:B_DIR[:NAMES_FILE]" in capsys.readouterr().err
