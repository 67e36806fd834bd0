"""File helpers shared by every stage: all-or-nothing writes and content hashes.

Folders are built in a temporary sibling and swapped into place (``replacing``), and only
a folder the stage made itself is ever replaced; single files are written to a temporary
sibling and renamed. Either way a failure leaves the previous version intact.
An ``OSError`` while writing (read-only filesystem, full disk, no permission) becomes a
one-line :class:`BadInputError` naming the path: retrying cannot help (exit 2).
"""

from __future__ import annotations

import errno
import fcntl
import hashlib
import os
import shutil
import sys
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from fusion import chaos
from fusion.errors import FULL, BadInputError, DiskFullError, FusionError


@contextmanager
def writable(path: str | Path) -> Iterator[None]:
    """Turn an OS error while writing under ``path`` into a one-line error naming it: a full
    disk is the system's (exit 75), anything else the destination's (exit 2)."""
    try:
        yield
    except OSError as exc:
        raise write_error(Path(exc.filename) if exc.filename else Path(path), exc) from exc


def write_error(path: str | Path, exc: OSError) -> FusionError:
    """The one-line error for an OS error writing ``path``: a full disk is the system's
    (exit 75), anything else the destination's (exit 2)."""
    if exc.errno in FULL:
        return DiskFullError(path)
    return BadInputError(path, f"cannot write ({exc.strerror or exc})")


@dataclass(frozen=True)
class Output:
    """A folder that a stage makes, and may therefore replace: the file that marks it as
    the stage's own (its manifest) and every entry the stage puts there. A folder holding
    anything else is somebody's data and is never replaced."""

    stage: str  # the command that makes it, for messages ("fusion prepare")
    marker: str  # the stage's manifest: present in every folder the stage made
    entries: frozenset[str]  # every name the stage writes at the folder's top level

    def check(self, dest: Path) -> None:
        """Refuse (exit 2, one line) to replace ``dest`` unless it is missing, empty, or a
        folder this stage made and nobody added to."""
        if not dest.exists() and not dest.is_symlink():
            return
        if dest.is_symlink() or not dest.is_dir():
            raise BadInputError(dest, f"exists and is not a folder {self.stage} made; "
                                      "refusing to replace it (give a new or empty folder)")
        held = set(os.listdir(dest))
        foreign = sorted(held - self.entries)
        if held and (foreign or self.marker not in held):
            what = ", ".join(foreign[:3]) + (" ..." if len(foreign) > 3 else "")
            raise BadInputError(dest, f"holds {what or 'no ' + self.marker}, not a folder "
                                      f"{self.stage} made; refusing to replace it (give a "
                                      "new or empty folder)")


def _exchange(a: Path, b: Path) -> bool:
    """Swap two paths in one atomic step (Linux ``renameat2(RENAME_EXCHANGE)``; Python has
    no binding for it). False where the system or the file system does not offer it."""
    if sys.platform != "linux":
        return False
    import ctypes

    libc = ctypes.CDLL(None, use_errno=True)
    if not hasattr(libc, "renameat2"):
        return False
    at_fdcwd, rename_exchange = -100, 2
    if libc.renameat2(at_fdcwd, os.fsencode(a), at_fdcwd, os.fsencode(b), rename_exchange) == 0:
        return True
    code = ctypes.get_errno()
    if code in (errno.EINVAL, errno.ENOSYS, errno.ENOTSUP):
        return False
    raise OSError(code, os.strerror(code), str(b))


def _siblings(dest: Path, tag: str) -> list[Path]:
    prefix = f".{dest.name}.{tag}"
    return [dest.parent / n for n in sorted(os.listdir(dest.parent)) if n.startswith(prefix)]


def _clear_leftovers(dest: Path) -> None:
    """What killed runs left beside ``dest`` (called holding its lock, so no live run owns
    any of it): temporary folders are removed; a previous version moved aside by the
    two-rename swap is put back when ``dest`` itself is missing, else removed."""
    for tmp in _siblings(dest, "tmp-"):
        print(f"note: removing {tmp}, left by an interrupted run", file=sys.stderr)
        shutil.rmtree(tmp)
    for old in _siblings(dest, "old"):
        if not dest.exists():
            print(f"note: restoring {dest} from {old.name}, left by an interrupted run",
                  file=sys.stderr)
            old.rename(dest)
        else:
            shutil.rmtree(old)


def _swap(tmp: Path, dest: Path) -> None:
    """Put the finished ``tmp`` at ``dest``: a reader sees the old folder or the new one,
    never none (an atomic exchange; where the file system has none, two renames whose
    interruption the next run repairs), then the old version is removed."""
    if not dest.exists():
        tmp.rename(dest)
    elif _exchange(tmp, dest):
        chaos.point("swap:exchanged")
        shutil.rmtree(tmp)  # now the old version
    else:
        old = dest.with_name(f".{dest.name}.old")
        dest.rename(old)
        chaos.point("swap:moved-aside")
        tmp.rename(dest)
        shutil.rmtree(old)


@contextmanager
def replacing(dest: str | Path, output: Output) -> Iterator[Path]:
    """Build a new version of the folder ``dest`` in the temporary sibling yielded, then
    swap it in; on any failure the previous version stays as it was.

    Only a folder ``output`` describes is ever replaced (else exit 2 before any work).
    The parent folder is locked throughout (``parent_lock``), so concurrent writers take
    turns, and what killed writers left is cleared first. An ``OSError`` while writing
    (read-only file system, full disk) becomes a one-line error naming the path."""
    dest = Path(dest)
    with writable(dest):
        dest.parent.mkdir(parents=True, exist_ok=True)
        output.check(dest)  # before waiting for the lock, and again under it
    with parent_lock(dest):
        with writable(dest):
            _clear_leftovers(dest)
            output.check(dest)
            tmp = dest.with_name(f".{dest.name}.tmp-{os.getpid()}")
            tmp.mkdir()
        try:
            with writable(dest):
                yield tmp
                chaos.point("swap:built")
                _swap(tmp, dest)
        finally:
            shutil.rmtree(tmp, ignore_errors=True)


@contextmanager
def parent_lock(dest: Path) -> Iterator[None]:
    """An exclusive ``flock`` on the folder that holds ``dest``, held by one writer of any
    folder in it at a time. The folder itself is the lock (a directory can be flocked), so
    no lock file is left beside the user's data; the kernel drops it when a holder dies."""
    fd = os.open(dest.parent, os.O_RDONLY)
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            print(f"waiting for another run writing in {dest.parent}", file=sys.stderr,
                  flush=True)
            fcntl.flock(fd, fcntl.LOCK_EX)
        yield
    finally:
        os.close(fd)  # releases the lock


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


def read_if_file(fs: Any, path: str) -> bytes | None:
    """A file's bytes on a pyarrow filesystem (local or S3), None when there is none."""
    import pyarrow.fs as pafs

    if fs.get_file_info(path).type != pafs.FileType.File:
        return None
    with fs.open_input_stream(path) as fh:
        return fh.read()
