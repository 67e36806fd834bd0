"""The paths a user touches: `fusion fuse`, `score`, `export` as command lines, one test per
defect found by trying them (issue: inference and CLI that never surprise)."""

from __future__ import annotations

import dataclasses
import fcntl
import os
import pty
import struct
import subprocess
import sys
import termios
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from tests.conftest import REPO, free_port, run_cli, save, textured


@pytest.fixture(scope="module")
def registry(tiny_run, tmp_path_factory):
    """A folder with its own SQLite registry holding the tiny model as dae-fuse champion."""
    from fusion.engine.exports import load_model, weights_digest
    from fusion.evaluation.evaluate import Candidate, evaluate
    from fusion.inference.fuse import TorchEngine
    from fusion.mlops.promotion import promote
    from fusion.mlops.register import register
    from fusion.params import BenchmarkSet, EvaluateParams, MlflowParams, PromoteParams

    tmp = tmp_path_factory.mktemp("registry")
    sample = REPO / "data/sample/tno"
    params = dataclasses.replace(
        tiny_run,
        evaluate=EvaluateParams(model=str(tiny_run.train.phase_out(2)),
                                sets=[BenchmarkSet("tno", str(sample / "ir"), str(sample / "vi"))],
                                out=str(tmp / "eval"), summary=str(tmp / "metrics"),
                                grids=str(tmp / "grids")),
        mlflow=MlflowParams(tracking_uri=f"sqlite:///{tmp / 'mlflow.db'}",
                            registered=str(tmp / "registered.json")),
        promote=PromoteParams(floor="none"))
    cwd = Path.cwd()
    os.chdir(tmp)
    try:
        evaluate(params, [Candidate("model", TorchEngine(load_model(params.evaluate.model),
                                                         params.family))],
                 weights_digest(params.evaluate.model))
        register(params)
        promote(params)
    finally:
        os.chdir(cwd)
    return tmp


@pytest.fixture
def pair(tmp_path) -> tuple[Path, Path]:
    return (save(tmp_path / "ir" / "07.png", textured(60, 80, 1)),
            save(tmp_path / "vi" / "07.png", textured(60, 80, 2)))


def test_the_configured_tracking_uri_wins_over_a_local_registry(registry, pair, tmp_path):
    """--set mlflow.tracking_uri names a server that does not answer: exit 75 naming it,
    although ./mlflow.db holds a champion (it used to load that one silently)."""
    dead = f"http://127.0.0.1:{free_port()}"
    run = run_cli("fuse", "--set", f"mlflow.tracking_uri={dead}", "--model",
                  "models:/dae-fuse@champion", "--a", str(pair[0]), "--b", str(pair[1]),
                  "-o", str(tmp_path / "x.png"), cwd=registry,
                  env={"MLFLOW_TRACKING_URI": ""})
    assert run.returncode == 75 and dead in run.stderr, run.stderr
    assert not (tmp_path / "x.png").exists()
    ok = run_cli("fuse", "--model", "models:/dae-fuse@champion", "--a", str(pair[0]),
                 "--b", str(pair[1]), "-o", str(tmp_path / "x.png"), cwd=registry)
    assert ok.returncode == 0, ok.stderr  # the default: ./mlflow.db


def test_an_unknown_alias_is_one_line_listing_what_exists(registry, pair, tmp_path):
    run = run_cli("fuse", "--model", "models:/dae-fuse@nosuch", "--a", str(pair[0]), "--b",
                  str(pair[1]), "-o", str(tmp_path / "x.png"), cwd=registry)
    assert run.returncode == 2
    assert run.stderr.count("\n") == 1, run.stderr
    assert "has no alias 'nosuch' (aliases: champion -> 1; versions: [1])" in run.stderr


def test_folder_mode_reports_a_repeated_stem_and_fuses_the_rest(tiny_run, tmp_path):
    a_dir, b_dir = tmp_path / "ir", tmp_path / "vi"
    save(a_dir / "ok.png", textured(40, 50, 1))
    save(b_dir / "ok.jpg", textured(40, 50, 2, rgb=True))
    save(a_dir / "01.png", textured(40, 50, 3))
    save(a_dir / "01.tif", textured(40, 50, 4))
    save(b_dir / "01.png", textured(40, 50, 5))
    save(a_dir / "mismatch.png", textured(40, 50, 6))
    save(b_dir / "mismatch.png", textured(41, 50, 7))
    save(a_dir / "alone.png", textured(40, 50, 8))
    (a_dir / "broken.png").write_bytes(b"junk")
    save(b_dir / "broken.png", textured(40, 50, 9))
    run = run_cli("fuse", "--model", str(tiny_run.train.phase_out(2)), "--a", str(a_dir),
                  "--b", str(b_dir), "-o", str(tmp_path / "out"))
    assert run.returncode == 1
    assert sorted(p.name for p in (tmp_path / "out").iterdir()) == ["ok.png"]
    assert "01.png: ambiguous: several files with stem '01' (01.png, 01.tif)" in run.stderr
    assert "vi/01.png: its partner in ir/ is ambiguous" in run.stderr
    assert "vi/mismatch.png: size mismatch: ir/mismatch.png is 50x40, vi/mismatch.png is " \
           "50x41" in run.stderr
    assert "alone.png: no partner in vi/" in run.stderr
    assert "broken.png: cannot decode image" in run.stderr


def test_an_existing_folder_as_output_gets_the_pair_named_file(tiny_run, pair, tmp_path):
    out = tmp_path / "out"
    out.mkdir()
    run = run_cli("fuse", "--model", str(tiny_run.train.phase_out(2)), "--a", str(pair[0]),
                  "--b", str(pair[1]), "-o", str(out))
    assert run.returncode == 0, run.stderr
    assert sorted(p.name for p in out.iterdir()) == ["07.png"]
    assert not list(tmp_path.glob(".*"))  # no stray temporary files


def test_16_bit_grey_ir_with_rgb_visible_writes_16_bit_colour(tiny_run, tmp_path):
    import cv2

    ir = save(tmp_path / "ir.png", textured(48, 64, 1, bits=16))
    vi = save(tmp_path / "vi.png", textured(48, 64, 2, rgb=True))
    for name in ("fused.png", "fused.tif"):
        run = run_cli("fuse", "--model", str(tiny_run.train.phase_out(2)), "--a", str(ir),
                      "--b", str(vi), "-o", str(tmp_path / name))
        assert run.returncode == 0, run.stderr
        pixels = cv2.imread(str(tmp_path / name), cv2.IMREAD_UNCHANGED)
        assert pixels.dtype == np.uint16 and pixels.shape == (48, 64, 3), name
    jpeg = run_cli("fuse", "--model", str(tmp_path / "no-model-needed"), "--a", str(ir),
                   "--b", str(vi), "-o", str(tmp_path / "fused.jpg"))
    assert jpeg.returncode == 2  # refused before any model is loaded
    assert "the result is 16-bit colour, which .jpg cannot hold; write .png or .tif" in \
        jpeg.stderr


def test_the_output_suffix_picks_the_format(tiny_run, pair, tmp_path):
    run = run_cli("fuse", "--model", str(tiny_run.train.phase_out(2)), "--a", str(pair[0]),
                  "--b", str(pair[1]), "-o", str(tmp_path / "fused.jpg"))
    assert run.returncode == 0, run.stderr
    assert (tmp_path / "fused.jpg").read_bytes()[:2] == b"\xff\xd8"  # JPEG, not PNG bytes
    assert Image.open(tmp_path / "fused.jpg").format == "JPEG"
    bad = run_cli("fuse", "--model", str(tiny_run.train.phase_out(2)), "--a", str(pair[0]),
                  "--b", str(pair[1]), "-o", str(tmp_path / "fused.gif"))
    assert bad.returncode == 2 and "unsupported output format '.gif'" in bad.stderr


def test_messages_name_their_subject():
    run = run_cli("fuse", "--set", "nosection.x=1", "--model", "m", "--a", "a", "--b", "b",
                  "-o", "o.png")
    assert run.returncode == 2
    assert "error: params: unknown key(s) ['nosection']" in run.stderr


def test_bad_input_is_reported_before_torch_is_imported(tmp_path):
    """A size mismatch answers without loading torch or the model (the start-up budget is
    measured in benchmarks/bench_startup.py)."""
    a = save(tmp_path / "a.png", textured(30, 40, 1))
    b = save(tmp_path / "b.png", textured(31, 40, 2))
    code = ("import sys\nfrom fusion.cli import main\n"
            f"code = main(['fuse', '--model', 'models:/x@y', '--a', {str(a)!r}, '--b', "
            f"{str(b)!r}, '-o', {str(tmp_path / 'o.png')!r}])\n"
            "print(code, sorted(m for m in ('torch', 'mlflow', 'ray') if m in sys.modules))\n")
    done = subprocess.run([sys.executable, "-c", code], cwd=REPO, capture_output=True,
                          text=True, timeout=120)
    assert done.stdout.strip() == "2 []", done.stdout + done.stderr
    assert f"size mismatch: {tmp_path.name}/a.png is 40x30, {tmp_path.name}/b.png is 40x31" \
        in done.stderr


def _in_a_terminal(args: list[str], cwd: Path) -> tuple[int, str]:
    """Run ``fusion ARGS`` with stdout and stderr on a pseudo-terminal."""
    pid, fd = pty.fork()
    if pid == 0:  # child: a 24x80 terminal (a 0x0 one hides every bar)
        fcntl.ioctl(0, termios.TIOCSWINSZ, struct.pack("HHHH", 24, 80, 0, 0))
        os.chdir(cwd)
        os.execv(sys.executable, [sys.executable, "-m", "fusion.cli", *args])
    output = b""
    while True:
        try:
            chunk = os.read(fd, 4096)
        except OSError:
            break
        if not chunk:
            break
        output += chunk
    _, status = os.waitpid(pid, 0)
    return os.waitstatus_to_exitcode(status), output.decode(errors="replace")


def test_progress_shows_on_a_terminal_only(tiny_run, tmp_path):
    for i in range(3):
        save(tmp_path / "ir" / f"{i}.png", textured(40, 48, i))
        save(tmp_path / "vi" / f"{i}.png", textured(40, 48, 10 + i))
    args = ["fuse", "--model", str(tiny_run.train.phase_out(2)), "--a", str(tmp_path / "ir"),
            "--b", str(tmp_path / "vi"), "-o", str(tmp_path / "out")]
    code, shown = _in_a_terminal(args, REPO)
    assert code == 0, shown
    assert "fuse:" in shown and "/3 [" in shown  # a tqdm bar over the 3 pairs
    code, quiet = _in_a_terminal(["--quiet", *args], REPO)
    assert code == 0 and "fuse:" not in quiet and "fused 3 pairs" in quiet
    piped = run_cli(*args)
    assert piped.returncode == 0 and "fuse:" not in piped.stderr + piped.stdout
    assert "\x1b[" not in piped.stderr + piped.stdout  # no colour codes in logs


def test_onnx_export_matches_torch_on_a_real_pair(tiny_runs, tmp_path, shared_data):
    """Every family exports; on a real TNO pair (768x576) onnxruntime gives the torch output
    within 1e-4 (float). Through the CLI (one family), the same 8-bit image up to rounding."""
    from fusion.engine.exports import load_model
    from fusion.evaluation.scoring import read_grey
    from fusion.inference.fuse import TorchEngine
    from fusion.inference.onnx import OnnxEngine, export_onnx
    from fusion.models import get_family

    a, b = (read_grey(shared_data / "tno" / m / "01.png") / 255 for m in ("ir", "vi"))
    for family in ("cddfuse", "mfdce-fuse"):
        model = load_model(tiny_runs[family].train.phase_out(2))
        onnx = export_onnx(model, get_family(family), tmp_path / f"{family}.onnx")
        ours = TorchEngine(model, get_family(family))(a, b)
        theirs = OnnxEngine.open(onnx)(a, b)
        assert np.abs(ours - theirs).max() < 1e-4, family
    model = tiny_runs["dae-fuse"].train.phase_out(2)
    onnx = tmp_path / "dae-fuse.onnx"
    run = run_cli("export", "--model", str(model), "--onnx", str(onnx))
    assert run.returncode == 0, run.stderr
    outs = {}
    for engine, ref in (("torch", model), ("onnxruntime", onnx)):
        out = tmp_path / f"{engine}.tif"
        run = run_cli("fuse", "--engine", engine, "--model", str(ref), "--a",
                      str(shared_data / "tno/ir/01.png"), "--b",
                      str(shared_data / "tno/vi/01.png"), "-o", str(out))
        assert run.returncode == 0, run.stderr
        outs[engine] = np.asarray(Image.open(out), dtype=np.float64)
    assert np.abs(outs["torch"] - outs["onnxruntime"]).max() <= 1  # 8-bit rounding
    ours = TorchEngine(load_model(model), get_family("dae-fuse"))(a, b)
    engine = OnnxEngine.open(onnx)
    theirs = engine(a, b)
    assert np.abs(ours - theirs).max() < 1e-4
    # the size met again runs on a session with it fixed: the same output; another size
    # goes back to the dynamic one
    assert not engine.fixed
    assert np.abs(engine(a, b) - theirs).max() < 1e-6 and list(engine.fixed) == [(608, 800)]
    assert engine(a[:100, :120], b[:100, :120]).shape == (100, 120)
    assert list(engine.fixed) == [(608, 800)]


def test_explain_writes_the_contribution_map(tiny_runs, pair, tmp_path):
    run = run_cli("fuse", "--model", str(tiny_runs["mfdce-fuse"].train.phase_out(2)), "--a",
                  str(pair[0]), "--b", str(pair[1]), "-o", str(tmp_path / "f.png"),
                  "--explain", str(tmp_path / "map.png"))
    assert run.returncode == 0, run.stderr
    weights = np.asarray(Image.open(tmp_path / "map.png"))
    assert weights.shape == (60, 80) and weights.dtype == np.uint8
    # above --exact-pixels the map is made in windows, as the fused image is: in fp32 equal
    # to the exact map (0 measured: local layers); in the default precision (bf16 where
    # native) within its 8-bit mantissa (2.0 grey levels measured)
    for precision, tolerance in (("fp32", 1), ("auto", 3)):
        windowed = run_cli("fuse", "--model", str(tiny_runs["mfdce-fuse"].train.phase_out(2)),
                           "--a", str(pair[0]), "--b", str(pair[1]), "-o",
                           str(tmp_path / "w.png"), "--explain", str(tmp_path / "wmap.png"),
                           "--exact-pixels", "0", "--window", "96", "--window-overlap", "8",
                           "--precision", precision)
        assert windowed.returncode == 0, windowed.stderr
        assert "80x60 is fused in 2 overlapping windows of 96 pixels" in windowed.stderr
        near = np.asarray(Image.open(tmp_path / "wmap.png")).astype(float)
        assert weights.std() > 10 and np.abs(near - weights).mean() < tolerance, precision
    other = run_cli("fuse", "--model", str(tiny_runs["dae-fuse"].train.phase_out(2)), "--a",
                    str(pair[0]), "--b", str(pair[1]), "-o", str(tmp_path / "g.png"),
                    "--explain", str(tmp_path / "map2.png"))
    assert other.returncode == 2 and "has no contribution map" in other.stderr


def test_help_documents_every_option():
    from fusion.cli import build_parser

    parser, _ = build_parser()
    for action in parser._subparsers._group_actions[0].choices.values():
        for option in action._actions:
            if option.dest not in ("help",):
                assert option.help, f"{action.prog} {option.option_strings}: no help text"
    version = run_cli("--version")
    assert version.returncode == 0 and version.stdout.startswith("fusion ")


def test_a_full_disk_stops_folder_fuse_at_once_with_exit_75(tiny_run, tmp_path):
    """ENOSPC on a small tmpfs: the run stops at the first pair that cannot be written
    (exit 75, the system's fault, naming the path) instead of fusing every pair left."""
    a, b = tmp_path / "ir", tmp_path / "vi"
    for i in range(6):
        save(a / f"p{i}.png", textured(256, 256, 2 * i))
        save(b / f"p{i}.png", textured(256, 256, 2 * i + 1))
    disk = tmp_path / "disk"
    disk.mkdir()
    if subprocess.run(["mount", "-t", "tmpfs", "-o", "size=160k", "tmpfs", str(disk)],
                      capture_output=True).returncode:
        pytest.skip("mounting a tmpfs needs root (CI runs as root)")
    try:
        run = run_cli("fuse", "--model", str(tiny_run.train.phase_out(2)), "--a", str(a),
                      "--b", str(b), "-o", str(disk / "out"), cwd=tmp_path)
        written = sorted(p.name for p in (disk / "out").iterdir()) if (disk / "out").exists() \
            else []
    finally:
        subprocess.run(["umount", str(disk)], check=True)
    assert run.returncode == 75, run.stderr
    assert run.stderr.count("\n") == 1 and "no space left on the device" in run.stderr
    assert str(disk / "out") in run.stderr and "Traceback" not in run.stderr
    assert 0 < len(written) < 6 and not [n for n in written if n.startswith(".")]


def test_every_error_is_one_line_naming_its_file(tiny_run, pair, tmp_path):
    """A YAML error, a config.json of the wrong sizes and weights of another shape: one
    line each, naming the file (line and column for YAML)."""
    import json
    import shutil

    bad_yaml = tmp_path / "bad.yaml"
    bad_yaml.write_text("data:\n  raw: [a, b\n  out: x\n")
    run = run_cli("prepare", "--params", str(bad_yaml), cwd=tmp_path)
    assert run.returncode == 2 and run.stderr.count("\n") == 1, run.stderr
    assert f"{bad_yaml}: not valid YAML: line 3, column " in run.stderr

    model = tmp_path / "model"
    shutil.copytree(tiny_run.train.phase_out(2), model)
    config = json.loads((model / "config.json").read_text())
    (model / "config.json").write_text(json.dumps({**config, "net": {**config["net"],
                                                                     "colour": 3}}))
    a, b = pair
    args = ["fuse", "--a", str(a), "--b", str(b), "-o", str(tmp_path / "f.png")]
    run = run_cli(*args, "--model", str(model), cwd=tmp_path)
    assert run.returncode == 2 and run.stderr.count("\n") == 1, run.stderr
    assert f"{model / 'config.json'}: net: unknown key(s) ['colour']" in run.stderr

    (model / "config.json").write_text(json.dumps({**config, "net": {**config["net"],
                                                                     "channels": 16}}))
    run = run_cli(*args, "--model", str(model), cwd=tmp_path)
    assert run.returncode == 2 and run.stderr.count("\n") == 1, run.stderr
    assert f"{model / 'model.safetensors'}: weights do not fit the network of config.json (" \
           in run.stderr and "in the file" in run.stderr


def test_paths_read_from_files_stay_inside_their_folder(tiny_run, tmp_path):
    """A downloaded MLmodel naming its weights '../..' or an absolute path, and a manifest
    whose pair paths leave their raw root: refused, naming the offending path."""
    import pyarrow as pa
    import pyarrow.parquet as pq
    import yaml

    from fusion.data.prepared import split_pairs
    from fusion.errors import BadInputError
    from fusion.mlops.pyfunc import WEIGHTS, artifact

    version = tmp_path / "version"
    version.mkdir()
    for crafted in ("../../elsewhere", "/etc"):
        flavor = {"artifacts": {WEIGHTS: {"path": crafted}}}
        (version / "MLmodel").write_text(yaml.safe_dump(
            {"flavors": {"python_function": flavor}}))
        with pytest.raises(BadInputError, match=f"artifact 'weights' path {crafted!r} leaves"):
            artifact(version, WEIGHTS)

    raw = tmp_path / "raw"
    raw.mkdir()
    data = tmp_path / "prepared"
    data.mkdir()
    rows = {"id": ["raw/x"], "a_path": ["raw/../../secret.png"], "b_path": ["raw/vi/x.png"],
            "split": ["val"]}
    pq.write_table(pa.table(rows), data / "manifest.parquet")
    with pytest.raises(BadInputError, match=r"a_path 'raw/\.\./\.\./secret\.png' leaves"):
        split_pairs(str(data), "", "val", [str(raw)])
