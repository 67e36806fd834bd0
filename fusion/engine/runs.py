"""Training runs: run names, single-process runs with resumable checkpoints, exports, curves.

A run's name is its phase plus a hash of everything that shapes its result (model, loss
and training parameters, the dataset manifest, the training code, the phase I model for
phase II): a rerun of the same configuration resumes its own checkpoints (e.g. after a
crash), a different one never does.
"""

from __future__ import annotations

import csv
import dataclasses
import hashlib
import json
import shutil
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from fusion.checkpoint import export_model, load_state, save_state
from fusion.data import PatchStream
from fusion.errors import FusionError
from fusion.model import DAEFuse
from fusion.params import Params
from fusion.train import Discriminators, Hooks, Trainer, resolve_device

CODE = ("model.py", "losses.py", "train.py", "data.py")  # code that shapes the weights
RESULT_KEYS = ("phase1_steps", "phase2_steps", "batch_size", "crop", "lr", "d_lr",
               "lr_min_ratio", "grad_clip", "seed")


def file_sha(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest() if path.exists() else "missing"


def _shaping(params: Params) -> dict[str, Any]:
    """What shapes the trained weights apart from the phase: sizes, loss weights, the
    training settings that change results, the dataset manifest and the training code."""
    t = params.train
    return {"model": dataclasses.asdict(params.model), "loss": dataclasses.asdict(params.loss),
            "train": {k: getattr(t, k) for k in RESULT_KEYS},
            "manifest": file_sha(Path(t.data) / "manifest.parquet"),
            "code": [file_sha(Path(__file__).with_name(name)) for name in CODE]}


def _digest(key: dict[str, Any]) -> str:
    return hashlib.sha256(json.dumps(key, sort_keys=True).encode()).hexdigest()


def run_name(params: Params, phase: int, workers: int | None = None) -> str:
    """``phase{N}-<hash>`` for single-process runs; Ray runs (``workers`` set) are named
    after their stage, ``train_phase{N}-<hash>``, and hash the worker count too (it sets
    the global batch)."""
    key = {"phase": phase, **_shaping(params)}
    if phase == 2:
        key["phase1"] = file_sha(Path(params.train.phase1_out) / "model.safetensors")
    if workers is not None:
        key["workers"] = workers
    return f"{'train_' if workers is not None else ''}phase{phase}-{_digest(key)[:12]}"


def fingerprint(params: Params) -> str:
    """sha256 of the data and params a trained model comes from; the retrain flow skips
    training when the champion was trained from the same fingerprint."""
    return _digest({**_shaping(params), "data": dataclasses.asdict(params.data),
                    "workers": params.ray.num_workers})


def checkpoints(folder: Path) -> list[Path]:
    """Complete checkpoints of a run, oldest first (temp folders are never listed)."""
    return sorted(p for p in folder.glob("step-*") if (p / "state.pt").exists())


def write_curve(rows: list[dict[str, float]], path: Path) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    names = list(dict.fromkeys(k for row in rows for k in row))
    with path.open("w", newline="") as fh:
        writer = csv.DictWriter(fh, fieldnames=names)
        writer.writeheader()
        writer.writerows({k: (f"{v:.3f}" if k == "time" else f"{v:.6g}")
                          if isinstance(v, float) else v for k, v in row.items()}
                         for row in rows)


def progress(phase: int, total: int) -> Callable[[int, dict[str, float]], None]:
    start = time.perf_counter()

    def report(step: int, metrics: dict[str, float]) -> None:
        elapsed = time.perf_counter() - start
        terms = " ".join(f"{k}={v:.4f}" for k, v in metrics.items() if k != "lr")
        print(f"phase {phase} step {step}/{total} ({elapsed:.0f}s) {terms}", file=sys.stderr,
              flush=True)
    return report


def phase1_init(params: Params) -> Path:
    """The phase I export that phase II starts from (an error when it is missing)."""
    init = Path(params.train.phase1_out)
    if not (init / "model.safetensors").exists():
        raise FusionError(f"{init}: no phase I model (run `fusion train --phase 1` first)")
    return init


def finish(params: Params, phase: int, state: dict[str, Any], name: str) -> Path:
    """Write the loss curve (for ``dvc plots``) and export the model of a final state."""
    t = params.train
    model, disc = DAEFuse(params.model), Discriminators(params.model)
    model.load_state_dict(state["model"])
    disc.load_state_dict(state["disc"])
    write_curve(state["curve"], Path(t.curves) / f"phase{phase}_curve.csv")
    out = Path(t.phase1_out if phase == 1 else t.phase2_out)
    return export_model(out, model, disc, {"phase": phase, "run": name, "steps": state["step"],
                                           "resumed_at": state["resumes"]})


def train_local(params: Params, phase: int, fresh: bool = False) -> Path:
    """Train one phase in this process (resuming its checkpoints) and export the model."""
    t = params.train
    init = phase1_init(params) if phase == 2 else None
    name = run_name(params, phase)
    folder = Path(t.checkpoints) / name
    if fresh:
        shutil.rmtree(folder, ignore_errors=True)
    trainer = Trainer(params, phase, resolve_device(t.device), init=init)
    existing = checkpoints(folder)
    if existing:
        trainer.load(load_state(existing[-1]))
        print(f"phase {phase}: resuming {name} from step {trainer.step}", file=sys.stderr)
    stream = PatchStream(Path(t.data) / "patches", "train", t.batch_size, t.seed, crop=t.crop)

    def save(step: int, state: dict) -> None:
        save_state(state, folder / f"step-{step:07d}")
        for old in checkpoints(folder)[:-t.keep_checkpoints]:
            shutil.rmtree(old)

    trainer.fit(stream.batch, Hooks(report=progress(phase, trainer.steps), save=save))
    return finish(params, phase, trainer.state(), name)
