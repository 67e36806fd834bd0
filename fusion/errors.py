"""Errors a user can act on: the CLI prints them as one line instead of a stack trace.

Exit codes tell orchestrators what to do with a failed stage: ``EXIT_BAD_INPUT`` (bad data
or configuration: retrying cannot help) and ``EXIT_TRANSIENT`` (a service did not answer:
retry later); anything else is a crash, which is worth a retry too (a lost Ray node).
"""

from __future__ import annotations

import errno
from pathlib import Path


class FusionError(Exception):
    """A problem with the user's input or configuration, with a message naming the cause."""


EXIT_BAD_INPUT = 2
EXIT_TRANSIENT = 75  # sysexits.h EX_TEMPFAIL


class TransientError(FusionError):
    """A service (tracking server, object store, cluster) did not answer: worth a retry."""


class DiskFullError(TransientError):
    """No space left where a stage writes: the system, not the input (exit 75). Stops a
    folder's run at once instead of fusing every remaining pair for nothing."""

    def __init__(self, path: str | Path) -> None:
        super().__init__(f"{path}: cannot write (no space left on the device)")
        self.path = Path(path)


FULL = frozenset({errno.ENOSPC, errno.EDQUOT})  # the errors DiskFullError stands for


class BadInputError(FusionError):
    """One input file is unusable; keeps the file and the reason apart for reject reports."""

    def __init__(self, path: str | Path, reason: str) -> None:
        super().__init__(f"{path}: {reason}")
        self.path = Path(path)
        self.reason = reason
