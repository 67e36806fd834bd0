"""All-or-nothing folder writes: build in a temporary sibling, then swap it into place."""

from __future__ import annotations

import os
import shutil
from pathlib import Path


def fresh_tmp(dest: Path) -> Path:
    """An empty temporary sibling of ``dest`` (same file system, so the rename is atomic)."""
    dest.parent.mkdir(parents=True, exist_ok=True)
    tmp = dest.with_name(f".{dest.name}.tmp-{os.getpid()}")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir()
    return tmp


def replace_dir(tmp: Path, dest: Path) -> None:
    """Swap a fully written ``tmp`` folder into place; an existing ``dest`` is replaced."""
    if dest.exists():
        old = dest.with_name(f".{dest.name}.old")
        shutil.rmtree(old, ignore_errors=True)
        dest.rename(old)
        tmp.rename(dest)
        shutil.rmtree(old)
    else:
        tmp.rename(dest)
