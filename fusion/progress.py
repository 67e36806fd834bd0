"""Progress bars for long work (prepare, folder fuse and score, evaluate, tiles), with tqdm.

Bars go to stderr and show only on a terminal: when stdout or stderr is not a TTY (logs,
pipes, DVC and Prefect runs) or with ``fusion --quiet`` they are off, so logs stay clean.
"""

from __future__ import annotations

import os
import sys
from collections.abc import Iterable, Iterator
from typing import TypeVar

T = TypeVar("T")
QUIET_ENV = "FUSION_QUIET"  # set by `fusion --quiet`, inherited by child processes


def enabled() -> bool:
    return (not os.environ.get(QUIET_ENV) and sys.stdout.isatty() and sys.stderr.isatty())


def progress(items: Iterable[T], desc: str, total: int | None = None, unit: str = "it",
             leave: bool = False) -> Iterator[T]:
    """``items`` with a progress bar when one is wanted (see the module docstring)."""
    if not enabled():
        yield from items
        return
    from tqdm import tqdm

    yield from tqdm(items, desc=desc, total=total, unit=unit, leave=leave, file=sys.stderr,
                    dynamic_ncols=True)
