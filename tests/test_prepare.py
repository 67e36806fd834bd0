import os
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq
import pytest

from fusion.data.prepare import patch_offsets, prepare
from fusion.data.shards import iter_shard, shard_paths
from fusion.errors import FusionError
from fusion.params import DataParams
from tests.conftest import REPO, save, textured

SMALL = DataParams(raw=[], out="", patch_size=16, stride=16, min_patch_std=0.02, val_ratio=0.0)


def _dataset(root: Path) -> Path:
    """Three good pairs (grey+RGB, 16-bit TIFF) and one of every bad-input kind."""
    save(root / "ir" / "good1.png", textured(40, 48, 1))
    save(root / "vi" / "good1.jpg", textured(40, 48, 2, rgb=True))
    save(root / "ir" / "good2.bmp", textured(33, 35, 3))
    save(root / "vi" / "good2.png", textured(33, 35, 4))
    save(root / "ir" / "deep.tif", textured(32, 32, 5, bits=16))
    save(root / "vi" / "deep.tif", textured(32, 32, 6, bits=16))
    save(root / "ir" / "mismatch.png", textured(40, 48, 7))
    save(root / "vi" / "mismatch.png", textured(41, 48, 8))
    save(root / "ir" / "broken.png", textured(40, 48, 9))
    (root / "vi" / "broken.png").write_bytes(b"\x89PNG\r\n\x1a\nnot really a png")
    save(root / "ir" / "empty.png", textured(40, 48, 10))
    (root / "vi" / "empty.png").write_bytes(b"")
    save(root / "ir" / "flat.png", np.full((40, 48), 77, np.uint8))
    save(root / "vi" / "flat.png", textured(40, 48, 11))
    save(root / "ir" / "alone.png", textured(40, 48, 12))
    (root / "vi" / "movie.gif").write_bytes(b"GIF89a")
    return root


def test_bad_inputs_are_reported_and_good_pairs_written(tmp_path):
    root = _dataset(tmp_path / "raw")
    out = tmp_path / "out"
    result = prepare(SMALL, raw=[str(root)], out=str(out), exclude=[])
    manifest = pq.read_table(out / "manifest.parquet").to_pylist()
    assert [r["id"] for r in manifest] == ["raw/deep", "raw/good1", "raw/good2"]
    rejects = {r["path"]: r["reason"] for r in pq.read_table(out / "rejects.parquet").to_pylist()}
    assert rejects["raw/vi/mismatch.png"] == ("size mismatch: ir/mismatch.png is 48x40, "
                                              "vi/mismatch.png is 48x41")
    assert rejects["raw/vi/broken.png"].startswith("cannot decode image")
    assert rejects["raw/vi/empty.png"] == "empty file"
    assert rejects["raw/ir/flat.png"] == "constant image (every pixel is 77)"
    assert rejects["raw/ir/alone.png"] == "no partner in vi/"
    assert rejects["raw/vi/movie.gif"] == "unsupported format '.gif'"
    assert len(result.rejects) == 6
    deep = next(r for r in manifest if r["id"] == "raw/deep")
    assert (deep["a_bits"], deep["b_bits"], deep["height"], deep["width"]) == (16, 16, 32, 32)
    good1 = next(r for r in manifest if r["id"] == "raw/good1")
    assert (good1["a_channels"], good1["b_channels"]) == (1, 3)
    assert good1["a_path"] == "raw/ir/good1.png" and len(good1["a_sha256"]) == 64


def test_strict_and_no_valid_pair_fail_without_touching_previous_output(tmp_path):
    root = _dataset(tmp_path / "raw")
    out = tmp_path / "out"
    prepare(SMALL, raw=[str(root)], out=str(out), exclude=[])
    before = {p: p.read_bytes() for p in sorted(out.rglob("*.parquet"))}
    strict = DataParams(**{**SMALL.__dict__, "strict": True})
    with pytest.raises(FusionError, match=r"strict\): 6 input\(s\) rejected"):
        prepare(strict, raw=[str(root)], out=str(out), exclude=[])
    bad = tmp_path / "bad"
    save(bad / "ir" / "x.png", textured(10, 10))
    save(bad / "vi" / "x.png", textured(11, 10))
    with pytest.raises(FusionError, match="no valid pair found .*size mismatch"):
        prepare(SMALL, raw=[str(bad)], out=str(out), exclude=[])
    assert {p: p.read_bytes() for p in sorted(out.rglob("*.parquet"))} == before
    assert not list(tmp_path.glob(".*"))  # no temporary folders left behind


def test_luma_conversion_and_patch_contents(tmp_path):
    rgb = textured(32, 32, 2, rgb=True)
    save(tmp_path / "raw" / "ir" / "p.png", textured(32, 32, 1))
    save(tmp_path / "raw" / "vi" / "p.png", rgb)
    params = DataParams(**{**SMALL.__dict__, "patch_size": 32})
    prepare(params, raw=[str(tmp_path / "raw")], out=str(tmp_path / "out"), exclude=[])
    (a, b), = list(iter_shard(shard_paths(tmp_path / "out" / "patches", "train")[0]))
    expected_y = (0.299 * rgb[..., 0] + 0.587 * rgb[..., 1] + 0.114 * rgb[..., 2]) / 255.0
    assert np.abs(b[0] - expected_y).max() <= 0.5 / 255 + 1e-6
    assert np.array_equal(a[0], textured(32, 32, 1) / np.float32(255.0))


def test_offsets_cover_the_far_edge():
    assert patch_offsets(300, 128, 64) == [0, 64, 128, 172]
    assert patch_offsets(128, 128, 64) == [0]
    assert patch_offsets(100, 128, 64) == []


def test_low_texture_patches_are_dropped(tmp_path):
    a = textured(32, 64, 1)
    a[:, :32] = 10
    b = textured(32, 64, 2)
    b[:, :32] = 200
    save(tmp_path / "raw" / "ir" / "p.png", a)
    save(tmp_path / "raw" / "vi" / "p.png", b)
    params = DataParams(**{**SMALL.__dict__, "patch_size": 32, "stride": 32})
    result = prepare(params, raw=[str(tmp_path / "raw")], out=str(tmp_path / "out"), exclude=[])
    assert result.patches["train"] == 1
    rows = pq.read_table(shard_paths(tmp_path / "out" / "patches", "train")[0]).to_pylist()
    assert [(r["y"], r["x"]) for r in rows] == [(0, 32)]


def test_deterministic_bytes_and_bounded_shards(tmp_path, shared_data):
    params = DataParams(raw=[str(shared_data / "roadscene")], out="", val_ratio=0.2,
                        shard_max_mb=2.0,
                        exclude=[str(shared_data / "roadscene" / "test_split.txt")])
    outs = [tmp_path / "one", tmp_path / "two"]
    for out in outs:
        prepare(params, out=str(out))
    files = sorted(p.relative_to(outs[0]) for p in outs[0].rglob("*.parquet"))
    assert len(files) > 4
    for rel in files:
        assert (outs[0] / rel).read_bytes() == (outs[1] / rel).read_bytes(), rel
    for shard in (outs[0] / "patches").glob("*.parquet"):
        assert shard.stat().st_size < 2 * 2**20


def test_roadscene_split_keeps_test_pairs_out_of_training(tmp_path, shared_data):
    test_names = (shared_data / "roadscene" / "test_split.txt").read_text().split()
    params = DataParams(raw=[str(shared_data / "roadscene")], out=str(tmp_path / "rs"),
                        exclude=[str(shared_data / "roadscene" / "test_split.txt")])
    result = prepare(params)
    assert result.splits["train"] + result.splits["val"] == 171
    assert result.splits["test"] == 50 and not result.rejects
    manifest = pq.read_table(tmp_path / "rs" / "manifest.parquet").to_pylist()
    test_stems = {Path(n).stem for n in test_names}
    assert {r["id"].split("/")[-1] for r in manifest if r["split"] == "test"} == test_stems
    trained = set()
    for shard in sorted((tmp_path / "rs" / "patches").glob("*.parquet")):
        trained |= set(pq.read_table(shard, columns=["pair_id"]).column("pair_id").to_pylist())
    assert trained and not {t.split("/")[-1] for t in trained} & test_stems
    assert sum(r["patches"] for r in manifest) == sum(result.patches.values())


def _cli(*args: str, cwd: Path = REPO) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "fusion.cli", *args], cwd=cwd,
                          capture_output=True, text=True, timeout=300)


def test_cli_prints_summary_and_clear_errors(tmp_path):
    root = _dataset(tmp_path / "raw")
    run = _cli("prepare", "--raw", str(root), "--out", str(tmp_path / "out"), "--exclude",
               "--summary", str(tmp_path / "s.json"), "--set", "data.patch_size=16")
    assert run.returncode == 0, run.stderr
    assert "prepare: 3 pairs (3 train), " in run.stdout and "6 rejected" in run.stdout
    assert "rejected raw/vi/empty.png: empty file" in run.stderr
    run = _cli("prepare", "--raw", str(root), "--out", str(tmp_path / "out"),
               "--set", "data.strict=true", "--exclude")
    assert run.returncode == 2
    assert run.stderr.startswith("fusion prepare: error: prepare (strict)")
    assert "Traceback" not in run.stderr
    run = _cli("prepare", "--raw", str(root), "--exclude", str(tmp_path / "missing.txt"))
    assert run.returncode == 2 and "missing.txt: cannot read exclusion list" in run.stderr


def test_pixel_limit_is_checked_from_the_header(tmp_path):
    """A tiny 1-bit PNG that decodes to 13000x13000 is refused before decoding."""
    from PIL import Image

    root = tmp_path / "raw"
    save(root / "ir" / "ok.png", textured(40, 48, 1))
    save(root / "vi" / "ok.png", textured(40, 48, 2))
    for side in ("ir", "vi"):
        Image.new("1", (13000, 13000)).save(root / side / "bomb.png")
    assert (root / "ir" / "bomb.png").stat().st_size < 100_000
    result = prepare(SMALL, raw=[str(root)], out=str(tmp_path / "out"), exclude=[])
    reasons = {r.path: r.reason for r in result.rejects}
    assert reasons["raw/ir/bomb.png"] == ("13000x13000 is 169 MP, over the limit of 50 MP "
                                          "(data.max_pixels)")
    assert result.splits["train"] == 1


def test_unwritable_output_is_exit_2_and_keeps_the_previous_dataset(tmp_path):
    """An output that cannot be written (here its parent is a file: fails for root too)."""
    root = _dataset(tmp_path / "raw")
    blocker = tmp_path / "blocker"
    blocker.write_text("a file where a folder should be")
    run = _cli("prepare", "--raw", str(root), "--out", str(blocker / "out"), "--exclude",
               "--summary", str(tmp_path / "s.json"), "--set", "data.patch_size=16")
    assert run.returncode == 2, run.stderr
    assert "blocker: cannot write" in run.stderr and "Traceback" not in run.stderr
    assert run.stderr.count("\n") == 1
    assert blocker.read_text() == "a file where a folder should be"


def _ids(out: Path) -> list[str]:
    return [r["id"] for r in pq.read_table(out / "manifest.parquet").to_pylist()]


def _raw(root: Path, *names: str) -> Path:
    for i, name in enumerate(names):
        save(root / "ir" / f"{name}.png", textured(40, 48, 2 * i + 1))
        save(root / "vi" / f"{name}.png", textured(40, 48, 2 * i + 2))
    return root


def test_a_folder_prepare_did_not_make_is_never_replaced(tmp_path):
    """`--out` naming a folder of the user's: exit 2, one line, not a byte touched."""
    raw = _raw(tmp_path / "raw", "p")
    mine = tmp_path / "thesis"
    mine.mkdir()
    (mine / "thesis.txt").write_text("four years of work")
    run = _cli("prepare", "--raw", str(raw), "--out", str(mine), "--exclude",
               "--set", "data.patch_size=16", "--summary", str(tmp_path / "s.json"))
    assert run.returncode == 2, run.stderr
    assert run.stderr.count("\n") == 1 and "Traceback" not in run.stderr
    assert f"{mine}: holds thesis.txt, not a folder fusion prepare made" in run.stderr
    assert sorted(p.name for p in mine.iterdir()) == ["thesis.txt"]
    assert (mine / "thesis.txt").read_text() == "four years of work"
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".thesis.tmp")]
    # a dataset prepare made is replaced; once somebody adds a file to it, it is not
    out = tmp_path / "out"
    assert _cli("prepare", "--raw", str(raw), "--out", str(out), "--exclude",
                "--set", "data.patch_size=16").returncode == 0
    assert _cli("prepare", "--raw", str(raw), "--out", str(out), "--exclude",
                "--set", "data.patch_size=16").returncode == 0
    (out / "notes.md").write_text("mine")
    run = _cli("prepare", "--raw", str(raw), "--out", str(out), "--exclude",
               "--set", "data.patch_size=16")
    assert run.returncode == 2 and "holds notes.md" in run.stderr
    assert (out / "notes.md").read_text() == "mine" and _ids(out) == ["raw/p"]


@pytest.mark.parametrize("point", ["swap:built", "swap:exchanged"])
def test_a_kill_at_each_step_of_the_swap_leaves_a_whole_dataset(tmp_path, point):
    """kill -9 (the chaos point exits hard) before and after the atomic exchange: the
    output is the old dataset or the new one, and the next run clears what was left."""
    out = tmp_path / "out"
    args = ("--out", str(out), "--exclude", "--set", "data.patch_size=16")
    assert _cli("prepare", "--raw", str(_raw(tmp_path / "one", "p")), *args).returncode == 0
    two = _raw(tmp_path / "two", "p", "q")
    crashed = subprocess.run([sys.executable, "-m", "fusion.cli", "prepare", "--raw", str(two),
                              *args], cwd=REPO, capture_output=True, text=True, timeout=300,
                             env={**os.environ, "FUSION_CHAOS": point})
    assert crashed.returncode == 70, crashed.stderr
    assert _ids(out) == (["one/p"] if point == "swap:built" else ["two/p", "two/q"])
    assert [p.name for p in tmp_path.glob(".out.tmp-*")]  # what the kill left
    rerun = _cli("prepare", "--raw", str(two), *args)
    assert rerun.returncode == 0, rerun.stderr
    assert "left by an interrupted run" in rerun.stderr
    assert _ids(out) == ["two/p", "two/q"]
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".out")]


def test_a_killed_build_and_a_half_done_fallback_swap_are_repaired(tmp_path, shared_data):
    """kill -9 in the middle of a real build leaves a temporary folder; the next run
    removes it. Where the file system has no atomic exchange, the swap moves the old
    dataset aside first: a run killed there is put back by the next run, even one that
    fails."""
    out = tmp_path / "out"
    proc = subprocess.Popen([sys.executable, "-m", "fusion.cli", "prepare", "--raw",
                             str(shared_data / "roadscene"), "--out", str(out), "--exclude",
                             "--summary", str(tmp_path / "s.json")], cwd=REPO,
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.time() + 120
    while not list(tmp_path.glob(".out.tmp-*/patches")) and time.time() < deadline:
        time.sleep(0.05)
    time.sleep(0.5)
    proc.kill()
    proc.wait()
    assert list(tmp_path.glob(".out.tmp-*")) and not out.exists()
    raw = _raw(tmp_path / "raw", "p")
    args = ("--raw", str(raw), "--out", str(out), "--exclude", "--set", "data.patch_size=16")
    assert _cli("prepare", *args).returncode == 0
    assert not list(tmp_path.glob(".out.tmp-*")) and _ids(out) == ["raw/p"]
    out.rename(tmp_path / ".out.old")  # the moment between the fallback's two renames
    save(raw / "ir" / "lone.png", textured(40, 48, 9))
    failed = _cli("prepare", *args, "--set", "data.strict=true")
    assert failed.returncode == 2 and "restoring" in failed.stderr
    assert _ids(out) == ["raw/p"] and not (tmp_path / ".out.old").exists()


def test_concurrent_writers_take_turns(tmp_path):
    """Two prepares of different data into one folder at once: both finish, and the
    folder holds one whole dataset, never a mix."""
    out = tmp_path / "out"
    runs = [subprocess.Popen([sys.executable, "-m", "fusion.cli", "prepare", "--raw",
                              str(_raw(tmp_path / name, *stems)), "--out", str(out),
                              "--exclude", "--set", "data.patch_size=16", "--summary",
                              str(tmp_path / f"{name}.json")], cwd=REPO,
                             stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
            for name, stems in (("one", ("p",)), ("two", ("p", "q")))]
    for proc in runs:
        _, err = proc.communicate(timeout=300)
        assert proc.returncode == 0, err
    assert _ids(out) in (["one/p"], ["two/p", "two/q"])
    shards = pq.read_table(out / "patches" / "train-00000.parquet").column("pair_id")
    assert {s.split("/")[0] for s in shards.to_pylist()} == {_ids(out)[0].split("/")[0]}
    assert not list(tmp_path.glob(".out.tmp-*"))
