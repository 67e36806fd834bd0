"""Crash points for fault drills: ``FUSION_CHAOS=<name>`` makes the process exit hard
(``os._exit``, no cleanup, as a kill -9 would) when it reaches the point of that name.
Only the drills in tests/test_chaos.py set it."""

from __future__ import annotations

import os
import sys

EXIT = 70


def point(name: str) -> None:
    if os.environ.get("FUSION_CHAOS") == name:
        print(f"chaos: exiting hard at {name}", file=sys.stderr, flush=True)
        os._exit(EXIT)
