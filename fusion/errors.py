"""Errors a user can act on: the CLI prints them as one line instead of a stack trace."""

from __future__ import annotations

from pathlib import Path


class FusionError(Exception):
    """A problem with the user's input or configuration, with a message naming the cause."""


class BadInputError(FusionError):
    """One input file is unusable; keeps the file and the reason apart for reject reports."""

    def __init__(self, path: str | Path, reason: str) -> None:
        super().__init__(f"{path}: {reason}")
        self.path = Path(path)
        self.reason = reason
