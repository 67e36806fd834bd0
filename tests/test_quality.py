"""The bundled starting checkpoints on real data (issues 14 and 29): the default family's
is the default network; every bundled family beats the training-free two-scale rule (the
default promotion floor) on every sample set; on the real TNO and MRI-CT pairs the default
one keeps dark background dark, with no border line and no 2x2 pattern."""

from __future__ import annotations

import dataclasses
import functools
from pathlib import Path

import numpy as np
import pytest
import yaml

from fusion.data.pairs import match_stems
from fusion.engine.exports import load_model, net_params, read_config, weights_digest
from fusion.evaluation.evaluate import Candidate, evaluate
from fusion.evaluation.scoring import read_grey
from fusion.family import get_family, list_families
from fusion.inference.fuse import TorchEngine
from fusion.mlops.promotion import floor
from fusion.params import load_params
from tests.conftest import REPO

PARAMS = load_params(REPO / "params.yaml")
BUNDLED = PARAMS.family.pretrained_path()
BUNDLED_FAMILIES = [name for name in list_families() if get_family(name).pretrained_path()]
DARK = 10  # /255: where both sources are darker, the fused pixel must be too
GOLDEN = Path(__file__).parent / "data" / "tno01_fused.npz"
CROPS = {"top_left": (slice(0, 64), slice(0, 96)), "centre": (slice(256, 320), slice(336, 432)),
         "bottom_right": (slice(512, 576), slice(672, 768))}


@functools.cache
def _engine(family: str) -> TorchEngine:
    """One engine per bundled family, shared by this module's tests."""
    return TorchEngine(load_model(get_family(family).pretrained_path()), get_family(family))


@pytest.fixture(scope="module")
def engine():
    assert BUNDLED is not None, "no bundled checkpoint (README: Bundled starting checkpoint)"
    return _engine(PARAMS.model.family)


def test_the_bundled_checkpoint_is_the_default_network_packed_small():
    assert BUNDLED is not None
    config = read_config(BUNDLED)
    assert config["family"] == PARAMS.model.family
    assert net_params(config) == PARAMS.config.net  # so `make demo` warm-starts from it
    assert {p.name for p in BUNDLED.iterdir()} == {"model.safetensors", "config.json",
                                                   "params.yaml", "metrics.json",
                                                   "PROVENANCE.md"}
    assert sum(p.stat().st_size for p in BUNDLED.iterdir()) < 2 << 20
    made_with = yaml.safe_load((BUNDLED / "params.yaml").read_text())
    assert made_with["train"]["init"] == ""  # from scratch
    assert any(e.endswith("roadscene/test_split.txt") for e in made_with["data"]["exclude"])


@pytest.mark.parametrize("family", BUNDLED_FAMILIES)
def test_every_bundled_checkpoint_beats_the_training_free_rule_on_every_sample_set(family,
                                                                                    tmp_path):
    """Issue 29: a family's bundled checkpoint clears the default promotion floor (the
    two-scale rule, which no training is needed to compute) on every sample set."""
    bundle = get_family(family).pretrained_path()
    sets = [dataclasses.replace(s, a=str(REPO / s.a), b=str(REPO / s.b),
                                names=str(REPO / s.names) if s.names else s.names)
            for s in PARAMS.evaluate.sets]
    ev = dataclasses.replace(PARAMS.evaluate, sets=sets, out=str(tmp_path / "eval"),
                             summary=str(tmp_path / "metrics"), grids=str(tmp_path / "grids"))
    params = dataclasses.replace(PARAMS, evaluate=ev)
    assert PARAMS.promote.floor == "two-scale"
    engine = _engine(family)
    summary = evaluate(params, [Candidate("model", engine)], weights_digest(bundle))
    assert set(summary) == {s.name for s in sets}
    ours = {name: methods["model"] for name, methods in summary.items()}
    rule = {name: methods["two-scale"] for name, methods in summary.items()}
    assert floor(ours, rule, PARAMS.promote) is None, summary


def test_the_inference_path_keeps_the_outputs(engine, shared_data):
    """TNO 01 fused by the bundled checkpoint stays within 1e-4 (issue 16's bound) of the
    pinned output: three crops of the float output, two of them at corners where padding
    matters. First pinned before the speed rewrites of the graph (commit 4044b89); pinned
    again when the checkpoint was rebuilt for issue 29 (a new network head), through the
    same inference path. A graph or engine change that moves the output fails here."""
    golden = np.load(GOLDEN)
    assert str(golden["digest"]) == weights_digest(BUNDLED), \
        f"the bundled checkpoint changed: {GOLDEN.name} pins the old one's output"
    fused = engine(*(read_grey(shared_data / "tno" / side / "01.png") / 255.0
                     for side in ("ir", "vi")))
    for name, crop in CROPS.items():
        assert np.abs(fused[crop] - golden[name]).max() < 1e-4, name


def _pairs(root: Path, a: str, b: str):
    pairs, problems = match_stems(root / a, root / b)
    assert pairs and not problems
    for stem, pa, pb in pairs:
        yield stem, read_grey(pa), read_grey(pb)


@pytest.mark.parametrize("family", BUNDLED_FAMILIES)
@pytest.mark.parametrize("name, a, b", [("tno", "ir", "vi"), ("mri_ct", "mri", "ct")])
def test_dark_stays_dark_without_border_lines_or_2x2_patterns(family, shared_data, name, a,
                                                               b):
    """Every real pair of the set: where both sources are below 10/255 the fused pixel is
    too; the outermost rows and columns are not darker or brighter than their neighbours
    beyond what the sources show; no checkerboard energy beyond the sources'."""
    engine = _engine(family)
    dark_pixels = 0
    for stem, ia, ib in _pairs(shared_data / name, a, b):
        fused = np.rint(engine(ia / 255.0, ib / 255.0) * 255)
        dark = (ia < DARK) & (ib < DARK)
        dark_pixels += int(dark.sum())
        assert (fused[dark] < DARK).all(), f"{name}/{stem}: dark background lifted to " \
                                           f"{fused[dark].max():.0f}/255"
        # each edge: the step from the outermost line to the next is no larger than the
        # sources' own step there (some sources have a dark frame) plus a margin
        for ours, theirs in zip(_edge_steps(fused), np.maximum(_edge_steps(ia),
                                                                 _edge_steps(ib)), strict=True):
            assert ours <= 1.1 * theirs + 2, f"{name}/{stem}: a border line ({ours:.1f} " \
                                             f"against the sources' {theirs:.1f})"
        assert _checkerboard(fused) <= 1.5 * max(_checkerboard(ia), _checkerboard(ib)) + 0.5, \
            f"{name}/{stem}: a 2x2 pattern"
    assert dark_pixels > 1000  # the sets do have dark background


def _edge_steps(img: np.ndarray) -> np.ndarray:
    """Mean |outermost line - next line| at the top, bottom, left and right edges."""
    x = img.astype(np.float64)
    return np.array([np.abs(x[0] - x[1]).mean(), np.abs(x[-1] - x[-2]).mean(),
                     np.abs(x[:, 0] - x[:, 1]).mean(), np.abs(x[:, -1] - x[:, -2]).mean()])


def _checkerboard(img: np.ndarray) -> float:
    """Mean |x[i,j] - x[i+1,j] - x[i,j+1] + x[i+1,j+1]|: the 2x2 alternating component."""
    x = img.astype(np.float64)
    return float(np.abs(x[:-1, :-1] - x[1:, :-1] - x[:-1, 1:] + x[1:, 1:]).mean())


def test_windowed_fusion_of_a_large_image_stays_close_to_exact(shared_data, tmp_path):
    """``fusion fuse --exact-pixels``: above it the bundled model fuses in overlapping
    windows (linear time), says so on stderr, and stays near the exact result on a real
    TNO pair (0.77 grey levels measured), with no seam where windows meet."""
    import subprocess
    import sys

    pair = [str(shared_data / "tno" / m / "01.png") for m in ("ir", "vi")]
    outs = {}
    for mode, extra in (("exact", []), ("windows", ["--exact-pixels", "0"])):
        outs[mode] = tmp_path / f"{mode}.png"
        run = subprocess.run([sys.executable, "-m", "fusion.cli", "fuse", "--model",
                              str(BUNDLED), "--a", pair[0], "--b", pair[1], "-o",
                              str(outs[mode]), *extra], cwd=REPO, capture_output=True,
                             text=True, timeout=300)
        assert run.returncode == 0, run.stderr
    assert "768x576 is fused in 4 overlapping windows of 512 pixels" in run.stderr
    diff = np.abs(read_grey(outs["windows"]) - read_grey(outs["exact"]))
    assert diff.mean() < 1.5  # grey levels
    seams = list(range(288, 480, 16))  # the columns where the two window columns overlap
    assert diff[:, seams].mean() < 3 * diff.mean() + 0.5
