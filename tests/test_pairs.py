from pathlib import Path

import pytest

from fusion.data.pairs import discover, match_stems
from fusion.errors import FusionError
from tests.conftest import save, textured


def _pair(root: Path, a: str, b: str, stem: str, a_ext=".png", b_ext=".png") -> None:
    save(root / a / f"{stem}{a_ext}", textured(20, 24))
    save(root / b / f"{stem}{b_ext}", textured(20, 24, seed=1))


def test_layouts_and_mixed_case(tmp_path):
    root = tmp_path / "mixed"
    _pair(root / "road", "ir", "vi", "x1", ".jpg", ".JPG")
    _pair(root / "msrs" / "train", "Infrared", "Visible", "00001D")
    _pair(root / "brain", "MRI", "Ct", "11")
    _pair(root / "brain2", "mri", "PET", "7", ".tif", ".bmp")
    _pair(root / "brain3", "Mri", "SPECT", "9", ".tiff", ".jpeg")
    pairs, rejects = discover(root)
    assert rejects == []
    assert [(p.id, p.a_modality, p.b_modality) for p in pairs] == [
        ("mixed/brain/11", "mri", "ct"),
        ("mixed/brain2/7", "mri", "pet"),
        ("mixed/brain3/9", "mri", "spect"),
        ("mixed/msrs/train/00001D", "ir", "vi"),
        ("mixed/road/x1", "ir", "vi"),
    ]
    assert pairs[3].a == Path("msrs/train/Infrared/00001D.png")


def test_mri_with_two_partner_modalities_gets_distinct_ids(tmp_path):
    _pair(tmp_path / "med", "mri", "ct", "1")
    save(tmp_path / "med" / "pet" / "1.png", textured(20, 24, seed=3))
    pairs, _ = discover(tmp_path / "med")
    assert [p.id for p in pairs] == ["med/1@ct", "med/1@pet"]


def test_unpaired_and_unsupported_files_are_rejected_with_reasons(tmp_path):
    root = tmp_path / "set"
    _pair(root, "ir", "vi", "good")
    save(root / "ir" / "lonely.png", textured(20, 24))
    save(root / "vi" / "orphan.png", textured(20, 24))
    (root / "ir" / "notes.txt").write_text("hello")
    (root / "vi" / ".DS_Store").write_text("")
    save(root / "ir" / "dup.png", textured(20, 24))
    save(root / "ir" / "dup.jpg", textured(20, 24))
    save(root / "vi" / "dup.png", textured(20, 24))
    pairs, rejects = discover(root)
    assert [p.id for p in pairs] == ["set/good"]
    reasons = {r.path: r.reason for r in rejects}
    assert reasons["set/ir/lonely.png"] == "no partner in vi/"
    assert reasons["set/vi/orphan.png"] == "no partner in ir/"
    assert reasons["set/ir/notes.txt"] == "unsupported format '.txt'"
    assert reasons["set/ir/dup.png"].startswith("ambiguous: several files with stem 'dup'")
    assert reasons["set/ir/dup.jpg"].startswith("ambiguous")
    assert reasons["set/vi/dup.png"] == "its partner in ir/ is ambiguous"
    assert not any(".DS_Store" in p for p in reasons)


def test_folder_without_layout_or_partner(tmp_path):
    save(tmp_path / "flat" / "a.png", textured(8, 8))
    _, rejects = discover(tmp_path / "flat")
    assert "no modality folders found" in rejects[0].reason
    save(tmp_path / "half" / "ir" / "a.png", textured(8, 8))
    _, rejects = discover(tmp_path / "half")
    assert rejects[0].path == "half/ir" and "no partner folder" in rejects[0].reason
    with pytest.raises(FusionError, match="raw data folder not found"):
        discover(tmp_path / "missing")


def test_symlinks_leaving_the_raw_root_are_rejected_unless_allowed(tmp_path):
    outside = tmp_path / "elsewhere"
    save(outside / "x.png", textured(20, 24))
    save(outside / "vi" / "y.png", textured(20, 24))
    root = tmp_path / "raw"
    _pair(root, "ir", "vi", "good")
    (root / "ir" / "x.png").symlink_to(outside / "x.png")
    save(root / "vi" / "x.png", textured(20, 24, seed=2))
    (root / "inner").mkdir()
    (root / "inner" / "ir").symlink_to(outside / "vi")  # a whole modality folder elsewhere
    save(root / "inner" / "vi" / "y.png", textured(20, 24))
    pairs, rejects = discover(root)
    assert [p.id for p in pairs] == ["raw/good"]
    reasons = {r.path: r.reason for r in rejects}
    assert reasons["raw/ir/x.png"].startswith(f"symlink to {outside / 'x.png'} leaves the raw")
    assert reasons["raw/inner/ir"].startswith("symlink to")
    assert reasons["raw/vi/x.png"] == "no partner in ir/"
    pairs, _ = discover(root, follow_symlinks=True)
    assert [p.id for p in pairs] == ["raw/good", "raw/inner/y", "raw/x"]


def test_match_stems_reports_every_file_it_cannot_pair(tmp_path):
    save(tmp_path / "a" / "01.png", textured(8, 8))
    save(tmp_path / "a" / "01.tif", textured(8, 8))
    save(tmp_path / "b" / "01.png", textured(8, 8))
    save(tmp_path / "a" / "02.png", textured(8, 8))
    save(tmp_path / "b" / "02.jpg", textured(8, 8))
    save(tmp_path / "b" / "03.png", textured(8, 8))
    pairs, errors = match_stems(tmp_path / "a", tmp_path / "b")
    assert [(s, a.name, b.name) for s, a, b in pairs] == [("02", "02.png", "02.jpg")]
    assert sorted(e.split(str(tmp_path))[1] for e in errors) == [
        "/a/01.png: ambiguous: several files with stem '01' (01.png, 01.tif)",
        "/a/01.tif: ambiguous: several files with stem '01' (01.png, 01.tif)",
        "/b/01.png: its partner in a/ is ambiguous",
        "/b/03.png: no partner in a/"]
