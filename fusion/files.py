"""File helpers shared by every stage: all-or-nothing writes and content hashes.

Folders are built in a temporary sibling and swapped into place; single files are written
to a temporary sibling and renamed. Either way a failure leaves the previous version intact.
An ``OSError`` while writing (read-only filesystem, full disk, no permission) becomes a
one-line :class:`BadInputError` naming the path: retrying cannot help (exit 2).
"""

from __future__ import annotations

import hashlib
import os
import shutil
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from fusion.errors import BadInputError, FusionError


@contextmanager
def writable(path: str | Path) -> Iterator[None]:
    """Turn an OS error while writing under ``path`` into a one-line error naming it."""
    try:
        yield
    except OSError as exc:
        where = Path(exc.filename) if exc.filename else Path(path)
        raise BadInputError(where, f"cannot write ({exc.strerror or exc})") from exc


def fresh_tmp(dest: Path) -> Path:
    """An empty temporary sibling of ``dest`` (same file system, so the rename is atomic)."""
    with writable(dest):
        dest.parent.mkdir(parents=True, exist_ok=True)
        tmp = dest.with_name(f".{dest.name}.tmp-{os.getpid()}")
        shutil.rmtree(tmp, ignore_errors=True)
        tmp.mkdir()
    return tmp


def replace_dir(tmp: Path, dest: Path) -> None:
    """Swap a fully written ``tmp`` folder into place; an existing ``dest`` is replaced."""
    with writable(dest):
        if dest.exists():
            old = dest.with_name(f".{dest.name}.old")
            shutil.rmtree(old, ignore_errors=True)
            dest.rename(old)
            tmp.rename(dest)
            shutil.rmtree(old)
        else:
            tmp.rename(dest)


def write_text(path: str | Path, text: str) -> Path:
    """Write a small text file atomically (temp file + rename)."""
    path = Path(path)
    with writable(path):
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
        try:
            tmp.write_text(text)
            tmp.replace(path)
        finally:
            tmp.unlink(missing_ok=True)
    return path


def sha256_file(path: str | Path) -> str:
    """Hex SHA-256 of a file's bytes, read in chunks."""
    digest = hashlib.sha256()
    with Path(path).open("rb") as fh:
        for chunk in iter(lambda: fh.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()


def sha256_tree(paths: list[Path], root: Path) -> str:
    """One SHA-256 over files (and the ``*.py`` files of folders), named relative to
    ``root``, so that moving the checkout elsewhere keeps the digest."""
    digest = hashlib.sha256()
    for path in paths:
        files = sorted(path.rglob("*.py")) if path.is_dir() else [path]
        for file in files:
            digest.update(str(file.relative_to(root)).encode())
            digest.update(sha256_file(file).encode() if file.exists() else b"missing")
    return digest.hexdigest()


def filesystem(uri: str, endpoint: str = "", what: str = "path") -> tuple[str, Any]:
    """(root, pyarrow filesystem) of a local folder or an ``s3://bucket/prefix``; ``what``
    names the setting in the error for any other scheme."""
    from urllib.parse import urlparse

    import pyarrow.fs as pafs

    url = urlparse(uri)
    if url.scheme == "s3":
        from fusion.s3 import s3_filesystem

        return f"{url.netloc}{url.path}".rstrip("/"), s3_filesystem(endpoint)
    if url.scheme not in ("", "file"):
        raise FusionError(f"{what} {uri!r}: only local folders and s3:// are supported")
    return str(Path(url.path if url.scheme else uri).resolve()), pafs.LocalFileSystem()
