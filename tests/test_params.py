import re

import pytest

from fusion.errors import FusionError
from fusion.params import load_params, to_dict
from tests.conftest import REPO


def test_repo_params_load_and_match_defaults_types():
    params = load_params(REPO / "params.yaml")
    assert params.data.patch_size == 128
    assert isinstance(params.data.val_ratio, float)
    assert "data" in to_dict(params)


def test_overrides_are_typed_like_dvc_exp_run_set(tmp_path):
    params = load_params(REPO / "params.yaml",
                         ["data.stride=96", "data.val_ratio=0", "data.raw=[a, b]",
                          "data.strict=true"])
    assert params.data.stride == 96
    assert params.data.val_ratio == 0.0 and isinstance(params.data.val_ratio, float)
    assert params.data.raw == ["a", "b"]
    assert params.data.strict is True


@pytest.mark.parametrize("override, message", [
    ("data.stride=fast", "data.stride: expected int"),
    ("data.nope=1", "unknown key(s) ['nope']"),
    ("nosection.key=1", "unknown key(s) ['nosection']"),
    ("data.strict=1", "expected true/false"),
    ("data.stride", "expected section.key=value"),
])
def test_bad_overrides_name_the_key(override, message):
    with pytest.raises(FusionError, match=re.escape(message)):
        load_params(REPO / "params.yaml", [override])


def test_missing_params_file_is_an_error(tmp_path):
    with pytest.raises(FusionError, match="params file not found"):
        load_params(tmp_path / "nope.yaml")


def test_benchmark_sets_are_typed_and_checked():
    params = load_params(REPO / "params.yaml",
                         ["evaluate.sets=[{name: tno, a: x/ir, b: x/vi}]"])
    assert params.evaluate.sets[0].name == "tno" and params.evaluate.sets[0].names == ""
    with pytest.raises(FusionError, match=re.escape("evaluate.sets[0]: missing key(s) ['b']")):
        load_params(REPO / "params.yaml", ["evaluate.sets=[{name: tno, a: x}]"])
