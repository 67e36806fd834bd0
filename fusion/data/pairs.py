"""Finding registered image pairs in the folder layouts people actually have.

A *pair folder* is any folder under a raw root that holds one source-A modality folder
(``ir``/``infrared``, ``mri``) and a matching source-B folder (``vi``/``vis``/``visible``,
``ct``/``pet``/``spect``), names in any case. Files are matched by stem across the two.
"""

from __future__ import annotations

import os
from collections import defaultdict
from dataclasses import dataclass
from pathlib import Path

from fusion.errors import FusionError
from fusion.imaging import SUPPORTED_SUFFIXES

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


def _files_by_stem(folder: Path, root: Path, rejects: list[Reject]) -> dict[str, Path]:
    """Supported image files of ``folder`` by stem; everything else becomes a reject."""
    by_stem: dict[str, list[Path]] = defaultdict(list)
    for entry in sorted(folder.iterdir()):
        if entry.name.startswith(".") or entry.is_dir():
            continue
        rel = entry.relative_to(root.parent)
        if entry.suffix.lower() not in SUPPORTED_SUFFIXES:
            rejects.append(Reject(str(rel), f"unsupported format {entry.suffix or '(none)'!r}"))
            continue
        by_stem[entry.stem].append(entry)
    unique = {}
    for stem, files in by_stem.items():
        if len(files) > 1:
            names = ", ".join(f.name for f in files)
            for f in files:
                rejects.append(Reject(str(f.relative_to(root.parent)),
                                      f"ambiguous: several files with stem {stem!r} ({names})"))
        else:
            unique[stem] = files[0]
    return unique


def _modality_folders(folder: Path) -> tuple[dict[str, Path], dict[str, Path]]:
    a, b = {}, {}
    for sub in sorted(p for p in folder.iterdir() if p.is_dir()):
        key = sub.name.lower()
        if key in A_FOLDERS:
            a[A_FOLDERS[key]] = sub
        elif key in B_FOLDERS:
            b[B_FOLDERS[key]] = sub
    return a, b


def discover(root: str | Path) -> tuple[list[Pair], list[Reject]]:
    """All pairs under ``root`` (sorted by id) and the files that could not be paired."""
    if not Path(root).is_dir():
        raise FusionError(f"{root}: raw data folder not found")
    root = Path(root).resolve()
    pairs: list[Pair] = []
    rejects: list[Reject] = []
    found_any = False
    for dirpath, dirnames, _ in os.walk(root):
        folder = Path(dirpath)
        dirnames.sort()
        a_dirs, b_dirs = _modality_folders(folder)
        modality_dirs = {p.name for p in [*a_dirs.values(), *b_dirs.values()]}
        dirnames[:] = [d for d in dirnames if d not in modality_dirs]
        if not a_dirs and not b_dirs:
            continue
        found_any = True
        matched_b: set[str] = set()
        for a_mod, a_dir in a_dirs.items():
            partners = [m for m in PARTNERS[a_mod] if m in b_dirs]
            if not partners:
                rejects.append(Reject(str(a_dir.relative_to(root.parent)),
                                      f"modality folder has no partner folder "
                                      f"({'/'.join(PARTNERS[a_mod])})"))
                continue
            for b_mod in partners:
                matched_b.add(b_mod)
                suffix = f"@{b_mod}" if len(partners) > 1 else ""
                pairs += _match(root, folder, a_dir, b_dirs[b_mod], a_mod, b_mod, suffix, rejects)
        for b_mod, b_dir in b_dirs.items():
            if b_mod not in matched_b:
                rejects.append(Reject(str(b_dir.relative_to(root.parent)),
                                      "modality folder has no partner folder"))
    if not found_any:
        rejects.append(Reject(root.name, "no modality folders found (expected ir/+vi/, "
                                         "infrared/+visible/ or mri/+ct|pet|spect/)"))
    pairs.sort(key=lambda p: p.id)
    return pairs, rejects


def _match(root: Path, folder: Path, a_dir: Path, b_dir: Path, a_mod: str, b_mod: str,
           suffix: str, rejects: list[Reject]) -> list[Pair]:
    a_files = _files_by_stem(a_dir, root, rejects)
    b_files = _files_by_stem(b_dir, root, rejects)
    prefix = "/".join([root.name, *folder.relative_to(root).parts])
    pairs = []
    for stem in sorted(set(a_files) | set(b_files)):
        pair_id = f"{prefix}/{stem}{suffix}"
        if stem not in b_files:
            rejects.append(Reject(str(a_files[stem].relative_to(root.parent)),
                                  f"no partner in {b_dir.name}/", pair_id))
        elif stem not in a_files:
            rejects.append(Reject(str(b_files[stem].relative_to(root.parent)),
                                  f"no partner in {a_dir.name}/", pair_id))
        else:
            pairs.append(Pair(pair_id, root, a_files[stem].relative_to(root),
                              b_files[stem].relative_to(root), a_mod, b_mod))
    return pairs
