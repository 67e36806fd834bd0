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
    assert set(summary["tno"]) == {"model", "cddfuse:phase2", "mfdce-fuse:phase2", "mean", "max",
                                   "two-scale"}
    assert summary["tno"]["model"]["pairs"] == 2 and summary["rs_test"]["max"]["pairs"] == 3
    rows = pq.read_table(tmp_path / "eval" / "per_image.parquet").to_pylist()
    assert len(rows) == (2 + 3) * 6 * 2  # pairs x methods x (raw, published protocol)
    assert {r["protocol"] for r in rows} == {"raw", "published"}
    assert {r["image"] for r in rows if r["set"] == "rs_test"} == {
        "FLIR_00211", "FLIR_00977", "FLIR_01130"}
    assert sorted(p.name for p in (tmp_path / "m").iterdir()) == [
        "rs_test-max.json", "rs_test-mean.json", "rs_test-published.json",
        "rs_test-two-scale.json", "rs_test.json", "tno-max.json", "tno-mean.json",
        "tno-published.json", "tno-two-scale.json", "tno.json"]
    row = json.loads((tmp_path / "m" / "tno.json").read_text())
    assert set(row) == {"EN", "SD", "SF", "MI", "SCD", "VIF", "Qabf", "SSIM", "pairs"}
    assert row["SSIM"] == pytest.approx(summary["tno"]["model"]["SSIM"], abs=1e-4)
    report = (tmp_path / "eval" / "report.md").read_text()
    assert "| mean |" in report and "| cddfuse:phase2 |" in report
    assert "SSIM at most 2" in report and "Published protocol (min-max stretched)" in report
    assert "| gate vs two-scale | > two-scale | > mean |" in report
    assert sum(line.startswith("| max | ") and line.endswith("/8 |") for line in
               report.splitlines()) == 2  # one standings row per set
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


def test_the_two_scale_baseline_is_the_rule_computed_by_hand():
    """max of the Gaussian bases plus both details, capped at 1.05 x the brighter source:
    numpy by hand (separable kernel, reflected borders) against the baseline evaluate
    scores."""
    import numpy as np

    from fusion.evaluation.evaluate import baselines
    from fusion.params import TwoScaleParams

    rng = np.random.default_rng(3)
    a, b = (np.round(rng.uniform(0, 255, (9, 11))) for _ in range(2))
    sigma, ceiling = 1.0, 0.05
    t = np.arange(-3, 4)
    k = np.exp(-(t / sigma) ** 2 / 2)
    k /= k.sum()

    def blur(x):
        x = np.pad(x, 3, mode="reflect")
        x = np.stack([np.convolve(row, k, mode="valid") for row in x])
        return np.stack([np.convolve(col, k, mode="valid") for col in x.T]).T

    ua, ub = a / 255, b / 255
    ga, gb = blur(ua), blur(ub)
    hand = np.maximum(ga, gb) + (ua - ga) + (ub - gb)
    hand = np.clip(np.minimum(hand, (1 + ceiling) * np.maximum(ua, ub)), 0, 1)
    ours = baselines(a, b, TwoScaleParams(sigma, ceiling))["two-scale"]
    assert np.allclose(ours, hand * 255, rtol=0, atol=1e-9)
    assert not np.allclose(ours, np.maximum(a, b))  # the details count


def test_published_protocol_scores_match_the_published_script(shared_data, tmp_path):
    """The published protocol (min-max stretch, then the metrics) on a real TNO pair agrees
    within 0.5 % with the published test script's own steps: the float output stretched,
    saved as an 8-bit PNG (imageio's rounding), scored by the reference evaluator."""
    import numpy as np

    from fusion.evaluation.evaluate import stretched
    from fusion.evaluation.scoring import read_grey, score_arrays
    from fusion.inference.rules import TwoScaleEngine
    from fusion.params import TwoScaleParams
    from tests import reference_metrics as ref

    a = read_grey(shared_data / "tno/ir/05.png")
    b = read_grey(shared_data / "tno/vi/05.png")
    fused = TwoScaleEngine(TwoScaleParams())(a / 255, b / 255).astype(np.float64) * 0.8
    ours = score_arrays(stretched(fused * 255), a, b)  # evaluate's published protocol
    unit = (fused - fused.min()) / (fused.max() - fused.min())  # the script, on floats
    theirs = ref.all_eight(np.floor(unit * 255 + 0.499999999), a, b)
    for name, value in theirs.items():
        assert ours[name] == pytest.approx(value, rel=0.005), name
    assert ours["SD"] > score_arrays(np.round(fused * 255), a, b)["SD"]  # it stretches


def test_fuse_runs_the_training_free_method(tmp_path):
    """`fusion fuse --method two-scale` needs no model; it refuses both or neither."""
    a, b = SAMPLE / "tno/ir/07.png", SAMPLE / "tno/vi/07.png"
    run = run_cli("fuse", "--method", "two-scale", "--a", str(a), "--b", str(b), "-o",
                  str(tmp_path / "f.png"), cwd=tmp_path)
    assert run.returncode == 0, run.stderr
    assert Image.open(tmp_path / "f.png").size == Image.open(a).size
    for extra in (["--model", "x", "--method", "two-scale"], []):
        run = run_cli("fuse", *extra, "--a", str(a), "--b", str(b), "-o",
                      str(tmp_path / "g.png"), cwd=tmp_path)
        assert run.returncode == 2 and "--model" in run.stderr and "--method" in run.stderr
