"""Finding registered image pairs: matching files by stem, in the folder layouts people have.

One rule everywhere (prepare, fuse, score, evaluate): files pair up by stem across two
modality folders (``a.jpg`` with ``a.PNG``); a stem held by two files of one folder is
ambiguous and never guessed, and a file without a partner is reported, never dropped
silently.

A *pair folder* is any folder under a raw root that holds one source-A modality folder
(``ir``/``infrared``, ``mri``) and a matching source-B folder (``vi``/``vis``/``visible``,
``ct``/``pet``/``spect``), names in any case. A symlink that points outside its raw root is
rejected unless ``data.follow_symlinks`` is set.
"""

from __future__ import annotations

import os
from collections import defaultdict
from dataclasses import dataclass, field
from pathlib import Path, PurePath, PurePosixPath
from typing import Any

from fusion.data.images import SUPPORTED_SUFFIXES
from fusion.errors import BadInputError, FusionError
from fusion.files import filesystem

A_FOLDERS = {"ir": "ir", "infrared": "ir", "mri": "mri"}
B_FOLDERS = {"vi": "vi", "vis": "vi", "visible": "vi", "ct": "ct", "pet": "pet", "spect": "spect"}
PARTNERS = {"ir": ("vi",), "mri": ("ct", "pet", "spect")}


@dataclass(frozen=True)
class Pair:
    """A matched pair; paths are relative to ``root`` so manifests do not hold machine paths."""

    id: str
    root: Path
    a: Path
    b: Path
    a_modality: str
    b_modality: str


@dataclass(frozen=True)
class Reject:
    """Something that could not become a training pair, and why."""

    path: str
    reason: str
    pair_id: str = ""


@dataclass
class Stems:
    """A folder's image files by stem: the unique ones, and those sharing a stem."""

    folder: PurePath
    unique: dict[str, Path] = field(default_factory=dict)
    ambiguous: dict[str, list[Path]] = field(default_factory=dict)
    unsupported: list[Path] = field(default_factory=list)
    escaping: list[Path] = field(default_factory=list)  # symlinks leaving the raw root

    def reason(self, stem: str) -> str:
        names = ", ".join(f.name for f in self.ambiguous[stem])
        return f"ambiguous: several files with stem {stem!r} ({names})"


def files_by_stem(folder: str | Path, root: Path | None = None,
                  follow_symlinks: bool = True) -> Stems:
    """Image files of ``folder`` by stem (hidden files and sub-folders skipped). With
    ``root`` given and ``follow_symlinks`` off, links resolving outside ``root`` are kept
    apart in ``escaping``."""
    folder = Path(folder)
    if not folder.is_dir():
        raise BadInputError(folder, "folder not found")
    stems = Stems(folder)
    by_stem: dict[str, list[Path]] = defaultdict(list)
    for entry in sorted(folder.iterdir()):
        if entry.name.startswith(".") or entry.is_dir():
            continue
        if root is not None and not follow_symlinks and _escapes(entry, root):
            stems.escaping.append(entry)
            continue
        if entry.suffix.lower() not in SUPPORTED_SUFFIXES:
            stems.unsupported.append(entry)
            continue
        by_stem[entry.stem].append(entry)
    for stem, files in by_stem.items():
        if len(files) > 1:
            stems.ambiguous[stem] = files
        else:
            stems.unique[stem] = files[0]
    return stems


def stems_at(uri: str, endpoint: str = "") -> tuple[Stems, Any]:
    """``files_by_stem`` of a local folder or an ``s3://bucket/prefix`` (one level, hidden
    names skipped), and the pyarrow filesystem its paths are on (local paths absolute,
    S3 paths ``bucket/key``)."""
    import pyarrow.fs as pafs

    root, fs = filesystem(uri, endpoint, "input folder")
    info = fs.get_file_info(root)
    if info.type != pafs.FileType.Directory and not (uri.startswith("s3://")
                                                      and info.type == pafs.FileType.NotFound):
        raise BadInputError(uri, "folder not found")
    stems = Stems(PurePosixPath(uri))
    by_stem: dict[str, list[PurePosixPath]] = defaultdict(list)
    for entry in sorted(fs.get_file_info(pafs.FileSelector(root, allow_not_found=True)),
                        key=lambda e: e.path):
        path = PurePosixPath(entry.path)
        if path.name.startswith(".") or entry.type != pafs.FileType.File:
            continue
        if path.suffix.lower() not in SUPPORTED_SUFFIXES:
            stems.unsupported.append(path)
            continue
        by_stem[path.stem].append(path)
    if not by_stem:
        raise BadInputError(uri, "no images (PNG, JPEG, BMP, TIFF) in this folder")
    for stem, files in by_stem.items():
        if len(files) > 1:
            stems.ambiguous[stem] = files
        else:
            stems.unique[stem] = files[0]
    return stems, fs


def pair_stems(a: Stems, b: Stems
               ) -> tuple[list[tuple[str, Path, Path]], list[tuple[str, Path, str]]]:
    """(stem, A file, B file) for stems unique on both sides, and (stem, file, reason) for
    every file that shares its stem, has an ambiguous partner or has none."""
    pairs, problems = [], []
    for stem in sorted(set(a.unique) | set(b.unique) | set(a.ambiguous) | set(b.ambiguous)):
        for side, other in ((a, b), (b, a)):
            if stem in side.ambiguous:
                problems += [(stem, f, side.reason(stem)) for f in side.ambiguous[stem]]
            elif stem in side.unique and stem in other.ambiguous:
                problems.append((stem, side.unique[stem],
                                 f"its partner in {other.folder.name}/ is ambiguous"))
            elif stem in side.unique and stem not in other.unique:
                problems.append((stem, side.unique[stem], f"no partner in {other.folder.name}/"))
        if stem in a.unique and stem in b.unique:
            pairs.append((stem, a.unique[stem], b.unique[stem]))
    return pairs, problems


def match_stems(a_dir: str | Path, b_dir: str | Path
                ) -> tuple[list[tuple[str, Path, Path]], list[str]]:
    """Folder mode of ``fuse`` and ``score``: the pairs, and one error line per file that
    cannot be paired."""
    pairs, problems = pair_stems(files_by_stem(a_dir), files_by_stem(b_dir))
    return pairs, [f"{path}: {reason}" for _, path, reason in problems]


def read_names(paths: list[str]) -> set[str]:
    """Names listed in files (one per line, ``#`` comments): pair ids, file names or stems;
    each name is also taken by its stem. (Exclusion lists, test splits.)"""
    names: set[str] = set()
    for path in paths:
        try:
            lines = Path(path).read_text().splitlines()
        except OSError as exc:
            raise FusionError(f"{path}: cannot read exclusion list ({exc.strerror})") from exc
        for line in lines:
            line = line.split("#", 1)[0].strip()
            if line:
                names.update({line, Path(line).stem})
    return names


def _modality_folders(folder: Path, root: Path, follow_symlinks: bool
                      ) -> tuple[dict[str, Path], dict[str, Path]]:
    a, b = {}, {}
    for sub in sorted(p for p in folder.iterdir() if p.is_dir()):
        if not follow_symlinks and _escapes(sub, root):
            continue  # reported by discover
        key = sub.name.lower()
        if key in A_FOLDERS:
            a[A_FOLDERS[key]] = sub
        elif key in B_FOLDERS:
            b[B_FOLDERS[key]] = sub
    return a, b


def discover(root: str | Path, follow_symlinks: bool = False
             ) -> tuple[list[Pair], list[Reject]]:
    """All pairs under ``root`` (sorted by id) and the files that could not be paired."""
    if not Path(root).is_dir():
        raise FusionError(f"{root}: raw data folder not found")
    root = Path(os.path.abspath(root))
    pairs: list[Pair] = []
    rejects: list[Reject] = []
    found_any = False
    for dirpath, dirnames, _ in os.walk(root, followlinks=follow_symlinks):
        folder = Path(dirpath)
        dirnames.sort()
        for name in [d for d in dirnames if not follow_symlinks and _escapes(folder / d, root)]:
            rejects.append(Reject(_rel(folder / name, root), _escape_reason(folder / name)))
            dirnames.remove(name)
        a_dirs, b_dirs = _modality_folders(folder, root, follow_symlinks)
        modality_dirs = {p.name for p in [*a_dirs.values(), *b_dirs.values()]}
        dirnames[:] = [d for d in dirnames if d not in modality_dirs]
        if not a_dirs and not b_dirs:
            continue
        found_any = True
        matched_b: set[str] = set()
        for a_mod, a_dir in a_dirs.items():
            partners = [m for m in PARTNERS[a_mod] if m in b_dirs]
            if not partners:
                rejects.append(Reject(_rel(a_dir, root), f"modality folder has no partner "
                                      f"folder ({'/'.join(PARTNERS[a_mod])})"))
                continue
            for b_mod in partners:
                matched_b.add(b_mod)
                suffix = f"@{b_mod}" if len(partners) > 1 else ""
                pairs += _match(root, folder, a_dir, b_dirs[b_mod], (a_mod, b_mod), suffix,
                                rejects, follow_symlinks)
        for b_mod, b_dir in b_dirs.items():
            if b_mod not in matched_b:
                rejects.append(Reject(_rel(b_dir, root), "modality folder has no partner folder"))
    if not found_any:
        rejects.append(Reject(root.name, "no modality folders found (expected ir/+vi/, "
                                         "infrared/+visible/ or mri/+ct|pet|spect/)"))
    pairs.sort(key=lambda p: p.id)
    return pairs, rejects


def _escapes(path: Path, root: Path) -> bool:
    return path.is_symlink() and not path.resolve().is_relative_to(root.resolve())


def _escape_reason(link: Path) -> str:
    return f"symlink to {link.resolve()} leaves the raw root (data.follow_symlinks allows it)"


def _rel(path: Path, root: Path) -> str:
    """A path as reports show it: from the raw root's name on."""
    return str(path.relative_to(root.parent))


def _match(root: Path, folder: Path, a_dir: Path, b_dir: Path, modalities: tuple[str, str],
           suffix: str, rejects: list[Reject], follow_symlinks: bool) -> list[Pair]:
    a, b = (files_by_stem(d, root, follow_symlinks) for d in (a_dir, b_dir))
    for side in (a, b):
        rejects += [Reject(_rel(f, root), f"unsupported format {f.suffix or '(none)'!r}")
                    for f in side.unsupported]
        rejects += [Reject(_rel(link, root), _escape_reason(link)) for link in side.escaping]
    prefix = "/".join([root.name, *folder.relative_to(root).parts])
    found, problems = pair_stems(a, b)
    rejects += [Reject(_rel(path, root), reason, f"{prefix}/{stem}{suffix}")
                for stem, path, reason in problems]
    return [Pair(f"{prefix}/{stem}{suffix}", root, pa.relative_to(root), pb.relative_to(root),
                 *modalities) for stem, pa, pb in found]
