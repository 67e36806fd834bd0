import re

import pytest

from fusion.errors import FusionError
from fusion.models import list_families
from fusion.params import Params, load_params, to_dict, typed
from tests.conftest import REPO


def test_repo_params_load_and_round_trip_through_to_dict():
    params = load_params(REPO / "params.yaml")
    assert params.data.patch_size == 128 and isinstance(params.data.val_ratio, float)
    assert params.model.family == "dae-fuse" and set(params.model.configs) == set(list_families())
    assert typed(Params, to_dict(params), "") == params  # the mapping is params.yaml's layout


def test_overrides_are_typed_like_dvc_exp_run_set(tmp_path):
    params = load_params(REPO / "params.yaml",
                         ["data.stride=96", "data.val_ratio=0", "data.raw=[a, b]",
                          "data.strict=true", "model.cddfuse.net.dim=16",
                          "model.family=cddfuse"])
    assert params.data.stride == 96
    assert params.data.val_ratio == 0.0 and isinstance(params.data.val_ratio, float)
    assert params.data.raw == ["a", "b"]
    assert params.data.strict is True
    assert params.config.net.dim == 16 and params.model_name == "cddfuse"


@pytest.mark.parametrize("override, message", [
    ("data.stride=fast", "data.stride: expected int"),
    ("data.nope=1", "data: unknown key(s) ['nope']"),
    ("nosection.key=1", "params: unknown key(s) ['nosection']"),
    ("data.strict=1", "expected true/false"),
    ("data.stride", "expected section.key=value"),
    ("model.family=nope", "unknown model family 'nope'; known: ['cddfuse', 'dae-fuse'"),
    ("model.dae-fuse.phase2.w_nope=1", "model.dae-fuse.phase2: unknown key(s) ['w_nope']"),
    ("train.steps=[10]", "train.steps: dae-fuse trains 2 phases, got 1 step counts"),
    ("model.dae-fuse.search=[{name: phase2.lr, low: 0.1, high: 1.0}]",
     "'phase2.lr' is not a loss weight of dae-fuse"),
    ("model.dae-fuse.search=[{name: phase1.lam, low: 0.0, high: 1.0, log: true}]", "low > 0"),
    ("promote.floor=median", "promote.floor must be one of"),
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


def test_reading_params_imports_no_torch():
    """Bad input is reported fast: params, the registry and the families' sections load
    without torch (checked in a fresh interpreter)."""
    import subprocess
    import sys

    code = ("import sys; import fusion.models; from fusion.params import load_params; "
            "load_params(); "
            "import fusion.cli; print(sorted(m for m in ('torch', 'ray', 'mlflow', 'timm') "
            "if m in sys.modules))")
    done = subprocess.run([sys.executable, "-c", code], cwd=REPO, capture_output=True,
                          text=True, timeout=60)
    assert done.returncode == 0, done.stderr
    assert done.stdout.strip() == "[]"


def test_code_defaults_are_params_yaml():
    """One value, one meaning: every default in the params dataclasses (families' sizes,
    loss weights and search spaces included) is the value params.yaml holds."""

    assert to_dict(Params()) == to_dict(load_params(REPO / "params.yaml"))
