"""The one training loop, for every family: each phase lowers its loss, exports round-trip,
resumes are exact, and checkpoints that fail verification are skipped, never loaded."""

import json
import shutil
import subprocess
import sys
from dataclasses import replace
from pathlib import Path

import pytest
import torch

from fusion.engine.batches import PatchStream
from fusion.engine.checkpoint import checkpoints, load_state, save_state
from fusion.engine.exports import load_model, load_weights
from fusion.engine.fingerprints import run_name
from fusion.engine.local_runner import train_local
from fusion.engine.trainer import Trainer
from fusion.errors import FusionError
from fusion.inference.fuse import TileSpec, TorchEngine
from fusion.models import get_family, list_families
from tests.conftest import REPO, tiny_params

FAMILIES = list_families()


def _fixed_batch(params):
    return PatchStream(params.train.data, "train", 8, seed=123).batch(0)


@pytest.mark.parametrize("family", FAMILIES)
def test_each_phase_lowers_its_loss(tiny_runs, family):
    """30 steps per phase (the session's tiny run): each phase's own objective on a fixed
    batch, from the weights the phase started with to the weights it exported. Phase 2
    starts at the two-scale rule (a zero head), whose gate loss a tiny model can only
    trim: at least 2 % there, 10 % in phase 1."""
    params = tiny_runs[family]
    a, b = _fixed_batch(params)
    for phase in (1, 2):
        start = load_weights(params.train.phase_out(phase - 1)) if phase > 1 else None
        before = Trainer(params, phase, init=start).evaluate(a, b)["loss"]
        after = Trainer(params, phase, init=load_weights(params.train.phase_out(phase))
                        ).evaluate(a, b)["loss"]
        assert after < (0.9 if phase == 1 else 0.98) * before, (family, phase, before, after)
    curve = (Path(params.train.curves) / "phase1_curve.csv").read_text().splitlines()
    assert curve[0].startswith("step,") and len(curve) == 1 + 30 // 5


def test_distillation_adds_the_l1_to_the_teachers_fused_image(tiny_runs):
    """``w_distill`` with ``train.teacher``: phase 2 of one family also learns another's
    fused images (here the bundled DAE-Fuse teaching the tiny CDDFuse). The term is the L1
    between the two fused images, computed independently here, and the phase's loss grows
    by exactly ``w_distill`` times it. Without a teacher the weight is a one-line error, not
    a silent no-op. (What distillation buys on the full sets: docs/quality.md.)"""
    student = tiny_runs["cddfuse"]
    teacher = get_family("dae-fuse").pretrained_folder()

    def with_distill(weight: float, folder: str):
        config = replace(student.config, phase2=replace(student.config.phase2,
                                                        w_distill=weight))
        return replace(student, model=replace(student.model, configs={
            **student.model.configs, "cddfuse": config}),
            train=replace(student.train, teacher=folder))

    a, b = _fixed_batch(student)
    init = load_weights(student.train.phase_out(2))
    plain = Trainer(with_distill(0.0, ""), 2, init=init).evaluate(a, b)
    taught = Trainer(with_distill(50.0, str(teacher)), 2, init=init).evaluate(a, b)
    fused = load_model(student.train.phase_out(2)).fuse(a, b)
    expected = (fused - load_model(teacher).fuse(a, b)).abs().mean()
    assert taught["distill"] == pytest.approx(float(expected), rel=1e-4)
    assert taught["loss"] - plain["loss"] == pytest.approx(50.0 * taught["distill"], rel=1e-4)
    assert taught["distill"] > 0.01  # the bundled teacher is not the tiny student's rule
    with pytest.raises(FusionError, match="w_distill: 50.0 needs a train.teacher"):
        with_distill(50.0, "")


def test_sensor_noise_reaches_the_network_and_not_the_rule_it_is_scored_against(tiny_runs):
    """``noise`` (a fusion phase's sensor noise): the network fuses noisy inputs, while the
    rule the gate loss compares with is the rule of the clean sources, bit for bit, so a
    detail gain that amplifies noise costs. Without it the forward pass is the plain one."""
    params = tiny_runs["cddfuse"]

    def with_noise(sigma: float):
        config = replace(params.config, phase2=replace(params.config.phase2, noise=sigma))
        return replace(params, model=replace(params.model, configs={
            **params.model.configs, "cddfuse": config}))

    a, b = _fixed_batch(params)
    init = load_weights(params.train.phase_out(2))
    with torch.no_grad():
        plain = Trainer(with_noise(0.0), 2, init=init)._forward(a, b)
        noisy = Trainer(with_noise(0.05), 2, init=init)._forward(a, b)
        clean = load_model(params.train.phase_out(2)).train()(a, b, 2)
    assert torch.equal(noisy["reference"], plain["reference"])
    assert torch.equal(plain["fused"], clean["fused"])
    assert (noisy["fused"] - plain["fused"]).std() > 0.01  # the network saw the noise


@pytest.mark.parametrize("family", FAMILIES)
def test_trained_weights_round_trip_through_the_export(tiny_runs, family):
    """The final training state (the last checkpoint) and the exported model give the
    same output, bit for bit; the export is safetensors + config.json, no pickle."""
    params = tiny_runs[family]
    folder = params.train.phase_out(2)
    assert sorted(p.name for p in folder.iterdir()) == sorted(
        ["config.json", "model.safetensors"]
        + (["critic.safetensors"] if get_family(family).phases[1].adversarial else []))
    config = json.loads((folder / "config.json").read_text())
    assert (config["format"], config["family"], config["phase"]) == ("fusion-model/2", family, 2)
    final = checkpoints(Path(params.train.checkpoints) / run_name(params, 2))[-1]
    state = load_state(final)
    assert state["step"] == 30
    trained = get_family(family).network_module().build(params.config.net).eval()
    trained.load_state_dict(state["model"])
    a, b = torch.rand(1, 1, 40, 56), torch.rand(1, 1, 40, 56)
    with torch.no_grad():
        assert torch.equal(trained.fuse(a, b), load_model(folder).fuse(a, b))


def test_a_broken_export_is_a_clear_error(tiny_run, tmp_path):
    broken = tmp_path / "broken"
    shutil.copytree(tiny_run.train.phase_out(2), broken)
    (broken / "model.safetensors").write_bytes(b"\x80\x04not safetensors")
    with pytest.raises(FusionError, match="cannot load weights"):
        load_model(broken)
    (broken / "config.json").write_text(json.dumps({"format": "fusion-model/2",
                                                    "family": "nope", "net": {}}))
    with pytest.raises(FusionError, match="unknown model family 'nope'"):
        load_model(broken)


@pytest.mark.parametrize("family", FAMILIES)
def test_resume_gives_the_same_weights(tiny_runs, family, tmp_path):
    params = tiny_runs[family]
    stream = PatchStream(params.train.data, "train", 4, seed=0)
    straight = Trainer(params, 1)
    straight.fit(stream.batch, until=8)
    first = Trainer(params, 1)
    first.fit(stream.batch, until=4)
    save_state(first.state(), tmp_path / "ck")
    resumed = Trainer(params, 1)
    resumed.load(load_state(tmp_path / "ck"))
    resumed.fit(PatchStream(params.train.data, "train", 4, seed=0).batch,
                until=8)
    assert resumed.step == straight.step == 8
    for (name, p), q in zip(straight.model.state_dict().items(),
                            resumed.model.state_dict().values(), strict=True):
        assert torch.equal(p, q), name
    for p, q in zip(straight.opt_g.state_dict()["state"].values(),
                    resumed.opt_g.state_dict()["state"].values(), strict=True):
        assert torch.equal(p["exp_avg"], q["exp_avg"])


def test_failed_checkpoint_write_keeps_the_previous_one(tmp_path, monkeypatch):
    save_state({"step": 1, "phase": 1, "w": torch.ones(3)}, tmp_path / "ck")

    def broken_save(obj, path):
        Path(path).write_bytes(b"partial")
        raise OSError("disk full")
    monkeypatch.setattr(torch, "save", broken_save)  # checkpoint imports torch lazily
    with pytest.raises(FusionError, match="cannot write"):
        save_state({"step": 2, "phase": 1, "w": torch.zeros(3)}, tmp_path / "ck")
    assert load_state(tmp_path / "ck")["step"] == 1
    assert [p.name for p in tmp_path.iterdir()] == ["ck"]


def test_a_corrupt_newest_checkpoint_is_skipped_and_training_resumes(tiny_run, tmp_path,
                                                                      capsys):
    """Truncate the newest local checkpoint: the rerun warns, naming it, resumes from the
    one before, and ends where an uninterrupted run ends."""
    params = replace(tiny_run, train=replace(tiny_run.train, out=str(tmp_path / "models"),
                                             checkpoints=str(tmp_path / "ck"),
                                             curves=str(tmp_path / "curves"),
                                             steps=[20, 20], checkpoint_every=5))
    train_local(params, 1)
    folder = Path(params.train.checkpoints) / run_name(params, 1)
    reference = load_weights(params.train.phase_out(1))[0]
    older, newest = checkpoints(folder)[-2:]
    state = newest / "state.pt"
    state.write_bytes(state.read_bytes()[: state.stat().st_size // 2])
    (params.train.phase_out(1) / "model.safetensors").unlink()
    capsys.readouterr()
    train_local(params, 1)
    err = capsys.readouterr().err
    assert f"warning: skipping checkpoint {newest}" in err
    assert "state.pt has" in err  # the manifest's size check caught the truncation
    assert f"resuming {run_name(params, 1)} from step 15" in err
    again = load_weights(params.train.phase_out(1))[0]
    assert all(torch.equal(reference[k], again[k]) for k in reference)
    # no good checkpoint left: exit 2 with what to do, unless --fresh
    for ck in checkpoints(folder):
        (ck / "manifest.json").unlink()
    with pytest.raises(FusionError, match="rerun with --fresh to start this run over"):
        train_local(params, 1)
    train_local(params, 1, fresh=True)
    assert load_state(checkpoints(folder)[-1])["step"] == 20


@pytest.mark.parametrize("family", ["dae-fuse", "cddfuse"])
def test_tiled_fusion_equals_whole_image_on_a_real_pair(tiny_runs, family, shared_data):
    """A trained model on a real TNO pair (768x576) in 512-pixel tiles: the global attention
    statistics are gathered over all tiles first, so the tiles reproduce the whole image."""
    from fusion.evaluation.scoring import read_grey

    model = load_model(tiny_runs[family].train.phase_out(2))
    a, b = (read_grey(shared_data / "tno" / m / "01.png") / 255 for m in ("ir", "vi"))
    whole = TorchEngine(model, get_family(family), TileSpec(size=4096))(a, b)
    tiled = TorchEngine(model, get_family(family), TileSpec(size=512, halo=64))(a, b)
    assert abs(whole - tiled).mean() < 1 / 255 / 100
    assert abs(whole - tiled).max() < 1e-4


def test_cli_train_without_the_previous_phase_is_a_clear_error(tmp_path):
    run = subprocess.run([sys.executable, "-m", "fusion.cli", "train", "--phase", "2",
                          "--set", f"train.out={tmp_path}/none",
                          "--set", f"train.data={tmp_path}"], cwd=REPO, capture_output=True,
                         text=True, timeout=300)
    assert run.returncode == 2
    assert "no phase 1 model (run `fusion train --phase 1` first)" in run.stderr


def test_rerun_resumes_its_own_run_only(tiny_run):
    assert checkpoints(Path(tiny_run.train.checkpoints) / run_name(tiny_run, 1))
    other = tiny_params(Path(tiny_run.train.data).parent, lr=1e-4)
    assert run_name(other, 1) != run_name(tiny_run, 1)
    assert run_name(tiny_run, 1) == run_name(tiny_run, 1)


def test_warm_start_from_a_folder_fine_tunes_and_keeps_its_lineage(tiny_run, tmp_path):
    """train.init = an export folder: the recipe's warm phases train from it, the others
    pass its weights through; the run name hashes the starting weights; the export records
    where it came from."""
    from fusion.mlops.model_refs import resolve_start

    folder = Path(tiny_run.train.out) / "phase2"
    train = replace(tiny_run.train, init=str(folder), out=str(tmp_path / "models"),
                    curves=str(tmp_path), checkpoints=str(tmp_path / "ck"), steps=[5, 5])
    params = replace(tiny_run, train=train)
    start = resolve_start(params)
    assert start.warm and start.source == str(folder)
    other = resolve_start(replace(params, train=replace(train, init=str(folder.parent /
                                                                           "phase1"))))
    names = {run_name(params, 1, start), run_name(params, 1, other), run_name(params, 1)}
    assert len(names) == 3  # scratch and two different starting weights: three runs

    assert params.family.warm_phases == (2,)  # DAE-Fuse fine-tunes the fusion phase only
    phase1 = train_local(params, 1, start)
    assert json.loads((phase1 / "config.json").read_text())["skipped"] == "warm start"
    assert load_weights(phase1)[0].keys() == load_weights(folder)[0].keys()
    assert all(torch.equal(v, load_weights(folder)[0][k]) for k, v in
               load_weights(phase1)[0].items())
    phase2 = train_local(params, 2, start)
    assert json.loads((phase2 / "config.json").read_text())["lineage"] == str(folder)
    moved = [k for k, v in load_weights(phase2)[0].items()
             if not torch.equal(v, load_weights(folder)[0][k])]
    assert moved  # phase 2 trained from the warm start


def test_no_stage_replaces_a_folder_it_did_not_make(tiny_run, tmp_path):
    """Exports, checkpoints, bundles and evaluations refuse a folder holding somebody's
    file (exit 2, naming it) and leave it as it was; their own folders they replace."""
    from fusion.data.prepare import PREPARED
    from fusion.engine.checkpoint import CHECKPOINT
    from fusion.engine.exports import EXPORT, export_model
    from fusion.evaluation.evaluate import EVALUATION
    from fusion.files import replacing
    from fusion.mlops.bundle import BUNDLE

    for output in (PREPARED, CHECKPOINT, EXPORT, BUNDLE, EVALUATION):
        mine = tmp_path / output.marker
        mine.mkdir()
        (mine / "thesis.txt").write_text("mine")
        with (pytest.raises(FusionError, match=f"holds thesis.txt, not a folder {output.stage}"),
              replacing(mine, output)):
            pytest.fail("the build must not start")
        assert [p.name for p in mine.iterdir()] == ["thesis.txt"]
    model = load_model(tiny_run.train.phase_out(2))
    net = tiny_run.config.net
    with pytest.raises(FusionError, match="holds thesis.txt"):
        export_model(tmp_path / "config.json", "dae-fuse", net, model, None, {})
    export_model(tmp_path / "fresh", "dae-fuse", net, model, None, {})
    export_model(tmp_path / "fresh", "dae-fuse", net, model, None, {"phase": 2})
    assert json.loads((tmp_path / "fresh" / "config.json").read_text())["phase"] == 2
