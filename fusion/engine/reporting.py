"""What a training run reports as it goes: a printed line per logged step, the same metrics
to a live sink (an MLflow run), and the loss curve as CSV for ``dvc plots``."""

from __future__ import annotations

import sys
import time
from pathlib import Path
from typing import Any, Protocol

from fusion.engine.trainer import Hooks
from fusion.files import write_text


class Sink(Protocol):
    """Where a phase's steps are logged live (an MLflow run: ``fusion.mlops.pipeline_runs``)."""

    def open(self) -> None: ...

    def log(self, step: int, metrics: dict[str, float]) -> None: ...

    def close(self) -> None: ...


def reporter(phase: int, total: int, sink: Sink | None) -> Hooks:
    """Hooks of the process that reports: one printed line per logged step (losses,
    elapsed time), the same metrics to ``sink``, and each checkpoint's step."""
    begin = time.perf_counter()

    def report(step: int, metrics: dict[str, float]) -> None:
        elapsed = time.perf_counter() - begin
        terms = " ".join(f"{k}={v:.4f}" for k, v in metrics.items() if k != "lr")
        print(f"phase {phase} step {step}/{total} ({elapsed:.0f}s) {terms}", file=sys.stderr,
              flush=True)
        if sink is not None:
            sink.log(step, metrics)

    def save(step: int, state: dict[str, Any]) -> None:
        if sink is not None:
            sink.log(step, {"checkpoint_step": step})
    return Hooks(report=report, save=save)


def write_curve(rows: list[dict[str, float]], path: Path) -> None:
    """The loss curve of a run as CSV, one row per logged step."""
    names = list(dict.fromkeys(k for row in rows for k in row))
    lines = [",".join(names)]
    for row in rows:
        lines.append(",".join("" if k not in row else (f"{row[k]:.3f}" if k == "time" else
                                                        f"{row[k]:.6g}") for k in names))
    write_text(path, "\n".join(lines) + "\n")
