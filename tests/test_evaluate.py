import dataclasses
import json
from pathlib import Path

import pyarrow.parquet as pq
import pytest
from PIL import Image

from fusion.errors import FusionError
from fusion.evaluate import evaluate
from fusion.params import BenchmarkSet, EvaluateParams
from tests.conftest import REPO


def _with_eval(params, tmp: Path, sets):
    ev = EvaluateParams(model=params.train.phase2_out, sets=sets, out=str(tmp / "eval"),
                        summary=str(tmp / "metrics.json"), grids=str(tmp / "grids"))
    return dataclasses.replace(params, evaluate=ev)


def test_evaluate_writes_metrics_report_and_grids(tiny_run, tmp_path):
    sample = REPO / "data/sample"
    sets = [BenchmarkSet("tno", str(sample / "tno/ir"), str(sample / "tno/vi")),
            BenchmarkSet("rs_test", str(sample / "roadscene/ir"), str(sample / "roadscene/vi"),
                         str(sample / "roadscene/test_split.txt"))]
    summary = evaluate(_with_eval(tiny_run, tmp_path, sets))
    assert summary["tno"]["model"]["pairs"] == 2 and summary["rs_test"]["model"]["pairs"] == 3
    assert set(summary["tno"]) == {"model", "mean", "max"}
    assert json.loads((tmp_path / "metrics.json").read_text()) == summary
    rows = pq.read_table(tmp_path / "eval" / "per_image.parquet").to_pylist()
    assert len(rows) == (2 + 3) * 3
    assert {r["image"] for r in rows if r["set"] == "rs_test"} == {
        "FLIR_00211", "FLIR_00977", "FLIR_01130"}
    report = (tmp_path / "eval" / "report.md").read_text()
    assert "| mean |" in report and "| max |" in report and "without min-max stretching" in report
    grid = Image.open(tmp_path / "grids" / "tno.png")
    assert grid.height > 100 and grid.width > grid.height
    assert len(list((tmp_path / "eval" / "fused" / "tno").glob("*.png"))) == 2


def test_evaluate_names_the_missing_folder(tiny_run, tmp_path):
    sets = [BenchmarkSet("ghost", str(tmp_path / "nope_a"), str(tmp_path / "nope_b"))]
    with pytest.raises(FusionError, match="nope_a: folder not found"):
        evaluate(_with_eval(tiny_run, tmp_path, sets))
