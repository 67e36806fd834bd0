import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from fusion import checkpoint
from fusion.checkpoint import load_model, load_state, save_state
from fusion.data import PatchStream
from fusion.errors import FusionError
from fusion.inference import TileSpec, fuse_tensors
from fusion.train import Trainer
from tests.conftest import REPO, tiny_params


def _fixed_batch(params):
    return PatchStream(Path(params.train.data) / "patches", "train", 8, seed=123).batch(0)


def test_short_run_lowers_both_phase_losses(tiny_run):
    a, b = _fixed_batch(tiny_run)
    before = Trainer(tiny_run, 1).evaluate(a, b)
    after_1 = Trainer(tiny_run, 1, init=tiny_run.train.phase1_out).evaluate(a, b)
    assert after_1["content"] < 0.8 * before["content"], (before, after_1)
    start_2 = Trainer(tiny_run, 2, init=tiny_run.train.phase1_out).evaluate(a, b)
    after_2 = Trainer(tiny_run, 2, init=tiny_run.train.phase2_out).evaluate(a, b)

    def fusion_loss(m):
        return m["text"] + m["int"]
    assert fusion_loss(after_2) < 0.9 * fusion_loss(start_2), (start_2, after_2)
    curve = (Path(tiny_run.train.curves) / "phase1_curve.csv").read_text().splitlines()
    assert curve[0].startswith("step,") and len(curve) == 1 + 30 // 5


def test_resume_gives_the_same_weights(tiny_run, tmp_path):
    params = tiny_run
    stream = PatchStream(Path(params.train.data) / "patches", "train", 4, seed=0)
    straight = Trainer(params, 1)
    straight.fit(stream.batch, until=8)
    first = Trainer(params, 1)
    first.fit(stream.batch, until=4)
    save_state(first.state(), tmp_path / "ck")
    resumed = Trainer(params, 1)
    resumed.load(load_state(tmp_path / "ck"))
    resumed.fit(PatchStream(Path(params.train.data) / "patches", "train", 4, seed=0).batch,
                until=8)
    assert resumed.step == straight.step == 8
    for (name, p), q in zip(straight.model.state_dict().items(),
                            resumed.model.state_dict().values(), strict=True):
        assert torch.equal(p, q), name
    for p, q in zip(straight.opt_g.state_dict()["state"].values(),
                    resumed.opt_g.state_dict()["state"].values(), strict=True):
        assert torch.equal(p["exp_avg"], q["exp_avg"])


def test_failed_checkpoint_write_keeps_the_previous_one(tmp_path, monkeypatch):
    save_state({"step": 1, "w": torch.ones(3)}, tmp_path / "ck")

    def broken_save(obj, path):
        Path(path).write_bytes(b"partial")
        raise OSError("disk full")
    monkeypatch.setattr(checkpoint.torch, "save", broken_save)
    with pytest.raises(OSError):
        save_state({"step": 2, "w": torch.zeros(3)}, tmp_path / "ck")
    assert load_state(tmp_path / "ck")["step"] == 1
    assert [p.name for p in tmp_path.iterdir()] == ["ck"]


def test_export_is_safetensors_and_loads_without_pickle(tiny_run, tmp_path):
    folder = Path(tiny_run.train.phase2_out)
    assert sorted(p.name for p in folder.iterdir()) == [
        "config.json", "discriminators.safetensors", "model.safetensors"]
    config = json.loads((folder / "config.json").read_text())
    assert config["format"] == "dae-fuse/1" and config["phase"] == 2
    assert config["model"]["channels"] == tiny_run.model.channels
    model = load_model(folder)
    a, b = torch.rand(1, 1, 40, 40), torch.rand(1, 1, 40, 40)
    assert torch.equal(model.fuse(a, b), load_model(folder).fuse(a, b))
    broken = tmp_path / "broken"
    broken.mkdir()
    (broken / "config.json").write_text((folder / "config.json").read_text())
    (broken / "model.safetensors").write_bytes(b"\x80\x04not safetensors")
    with pytest.raises(FusionError, match="cannot load weights"):
        load_model(broken)


def test_tiled_fusion_equals_whole_image(tiny_run, shared_data):
    """A trained model on a real TNO pair (768x576) in 512-pixel tiles: the global attention
    statistics are gathered over all tiles first, so the tiles reproduce the whole image."""
    from fusion.scoring import read_grey
    model = load_model(tiny_run.train.phase2_out)
    ta, tb = (torch.from_numpy(read_grey(shared_data / "tno" / m / "01.png")).float()[None, None]
              / 255 for m in ("ir", "vi"))
    whole = fuse_tensors(model, ta, tb, TileSpec(size=4096))
    tiled = fuse_tensors(model, ta, tb, TileSpec(size=512, halo=64))
    assert (whole - tiled).abs().mean().item() < 1 / 255 / 100
    assert (whole - tiled).abs().max().item() < 1e-4


def _cli(*args):
    return subprocess.run([sys.executable, "-m", "fusion.cli", *args], cwd=REPO,
                          capture_output=True, text=True, timeout=300)


def test_cli_train_phase2_without_phase1_is_a_clear_error(tmp_path):
    run = _cli("train", "--phase", "2", "--set", f"train.phase1_out={tmp_path}/none",
               "--set", f"train.data={tmp_path}")
    assert run.returncode == 2
    assert "no phase I model (run `fusion train --phase 1` first)" in run.stderr


def test_cli_fuse_folder_mode_reports_bad_pairs_and_continues(tiny_run, tmp_path):
    from tests.conftest import save, textured
    a_dir, b_dir = tmp_path / "ir", tmp_path / "vi"
    save(a_dir / "ok.png", textured(40, 50, 1))
    save(b_dir / "ok.jpg", textured(40, 50, 2, rgb=True))
    save(a_dir / "mismatch.png", textured(40, 50, 3))
    save(b_dir / "mismatch.png", textured(41, 50, 4))
    save(a_dir / "alone.png", textured(40, 50, 5))
    (a_dir / "broken.png").write_bytes(b"junk")
    save(b_dir / "broken.png", textured(40, 50, 6))
    run = _cli("fuse", "--model", tiny_run.train.phase2_out, "--a", str(a_dir), "--b",
               str(b_dir), "-o", str(tmp_path / "out"))
    assert run.returncode == 1
    assert sorted(p.name for p in (tmp_path / "out").iterdir()) == ["ok.png"]
    assert "mismatch.png: size mismatch" in run.stderr
    assert "alone.png: no partner" in run.stderr
    assert "broken.png: cannot decode image" in run.stderr
    single = _cli("fuse", "--model", tiny_run.train.phase2_out, "--a", str(a_dir / "ok.png"),
                  "--b", str(b_dir / "ok.jpg"), "-o", str(tmp_path / "one.png"))
    assert single.returncode == 0, single.stderr
    bad = _cli("fuse", "--model", tiny_run.train.phase2_out, "--a", str(a_dir / "mismatch.png"),
               "--b", str(b_dir / "mismatch.png"), "-o", str(tmp_path / "two.png"))
    assert bad.returncode == 2 and "Traceback" not in bad.stderr


def test_rerun_resumes_its_own_run_only(tiny_run, tmp_path):
    from fusion.runs import checkpoints, run_name
    assert checkpoints(Path(tiny_run.train.checkpoints) / run_name(tiny_run, 1))
    other = tiny_params(Path(tiny_run.train.data).parent, lr=1e-4)
    assert run_name(other, 1) != run_name(tiny_run, 1)
