"""Where a model comes from, as the records name it: the code's git commit and file
digests."""

from __future__ import annotations

import subprocess
from pathlib import Path

from fusion.files import sha256_file


def git_commit() -> str:
    try:
        return subprocess.run(["git", "rev-parse", "HEAD"], capture_output=True, text=True,
                              check=True, timeout=10).stdout.strip()
    except (OSError, subprocess.SubprocessError):
        return "unknown"


def sha_or_missing(path: Path) -> str:
    """SHA-256 of a file that may not exist ("missing")."""
    return sha256_file(path) if path.exists() else "missing"
