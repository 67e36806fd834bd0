"""Training phases on Ray Train: the single-process loop, run by every DDP worker.

The driver joins a cluster (``fusion.engine.cluster``), starts a ``TorchTrainer`` for the
run (named after the stage and a hash of its configuration) and turns the final checkpoint
into the stage's exported model. Checkpoints live in ``ray.storage_path`` (a folder or
``s3://bucket/prefix``) under ``<run>/attempt-NNN/step-NNNNNNN/``: each invocation of the
driver is a new Ray run (attempt), and every worker resumes from the newest checkpoint of
any attempt that verifies (its manifest matches), so a corrupt or missing checkpoint is
skipped with a warning rather than wedging the run, and Ray's own run snapshot is never
needed. Workers that die are restarted from there up to ``ray.max_failures`` times.
"""

from __future__ import annotations

import os
import sys
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from fusion.engine.checkpoint import (
    MANIFEST,
    STATE_FILE,
    check_state,
    newest_good,
    read_state,
    save_state,
)
from fusion.engine.cluster import connect, storage, torch_trainer, worker_start
from fusion.engine.fingerprints import run_name
from fusion.engine.phase_export import finish, pass_through
from fusion.engine.reporting import Sink, reporter
from fusion.engine.start import NO_START, Start, phase_weights
from fusion.engine.trainer import Hooks, Trainer
from fusion.errors import FusionError, TransientError
from fusion.files import read_if_file
from fusion.params import Params


@dataclass(frozen=True)
class Fault:
    """Chaos hook for tests and drills: worker ``rank`` exits hard at ``step``, once
    (``marker`` is created on the first hit and disarms the fault)."""

    step: int
    marker: str
    rank: int = 0


@dataclass(frozen=True)
class RunStore:
    """Where one run's checkpoints live, all attempts together."""

    fs: Any  # pyarrow filesystem
    root: str  # <storage>/<run name>

    def steps(self) -> list[str]:
        """Checkpoint folders of every attempt, by step (then attempt), oldest first."""
        import pyarrow.fs as pafs

        if self.fs.get_file_info(self.root).type != pafs.FileType.Directory:
            return []
        found = [i.path for i in self.fs.get_file_info(pafs.FileSelector(self.root,
                                                                          recursive=True))
                 if i.type == pafs.FileType.Directory and i.base_name.startswith("step-")
                 and "/attempt-" in i.path]
        return sorted(found, key=lambda p: (p.rsplit("/", 1)[1], p))

    def attempts(self) -> list[str]:
        import pyarrow.fs as pafs

        if self.fs.get_file_info(self.root).type != pafs.FileType.Directory:
            return []
        return sorted(i.base_name for i in self.fs.get_file_info(pafs.FileSelector(self.root))
                      if i.base_name.startswith("attempt-"))

    def load(self, folder: str) -> dict[str, Any]:
        """A checkpoint's state, verified against its manifest (FusionError if bad)."""
        reason = check_state(read_if_file(self.fs, f"{folder}/{MANIFEST}"),
                             read_if_file(self.fs, f"{folder}/{STATE_FILE}"))
        if reason:
            raise FusionError(f"not a good training checkpoint ({reason})")
        return read_state(read_if_file(self.fs, f"{folder}/{STATE_FILE}"), folder)

    def newest(self) -> dict[str, Any] | None:
        return newest_good(self.steps(), self.load, self.root.rsplit("/", 1)[-1])

    def delete(self) -> None:
        import pyarrow.fs as pafs

        if self.fs.get_file_info(self.root).type != pafs.FileType.NotFound:
            self.fs.delete_dir(self.root)

    def prune(self, keep: str, steps: int) -> None:
        """Once the run has finished: drop the attempts before ``keep`` and all but its
        newest ``steps`` checkpoints (Ray's ``num_to_keep`` once left a checkpoint from
        before a worker-group restart behind)."""
        for attempt in self.attempts():
            if attempt != keep:
                self.fs.delete_dir(f"{self.root}/{attempt}")
        for folder in [f for f in self.steps() if f"/{keep}/" in f][:-steps]:
            self.fs.delete_dir(folder)


def _worker(config: dict[str, Any]) -> None:
    """One DDP worker: build the trainer, resume from the newest good checkpoint of the run,
    run the shared loop, report metrics and checkpoints."""
    import ray.train
    import ray.train.torch

    params, rank, world, device, stream = worker_start(config)
    phase: int = config["phase"]
    fault: Fault | None = config["fault"]
    store: RunStore = config["store"]
    trainer = Trainer(params, phase, device, init=config["init"],
                      wrap=ray.train.torch.prepare_model)
    state = store.newest()
    if state is not None:
        trainer.load(state)
        if rank == 0:
            print(f"phase {phase}: resuming from step {trainer.step}", file=sys.stderr)
    sink: Sink | None = config["sink"] if rank == 0 else None
    shown = reporter(phase, trainer.steps, sink) if rank == 0 else Hooks()

    def batches(step: int):
        if fault and rank == fault.rank and step == fault.step and not Path(fault.marker).exists():
            Path(fault.marker).touch()
            print(f"fault injected: worker {rank} exits at step {step}", file=sys.stderr)
            os._exit(1)
        return stream.batch(step)

    def report(step: int, metrics: dict[str, float]) -> None:
        shown.report(step, metrics)
        ray.train.report({"step": step, **metrics})

    def save(step: int, state: dict[str, Any]) -> None:
        metrics = {"step": step, **(trainer.curve[-1] if trainer.curve else {})}
        if rank != 0:  # every worker must call report; only rank 0 holds the checkpoint
            ray.train.report(metrics)
            return
        with tempfile.TemporaryDirectory() as tmp:
            folder = save_state(state, Path(tmp) / "state")
            ray.train.report(metrics, checkpoint=ray.train.Checkpoint.from_directory(folder),
                             checkpoint_dir_name=f"step-{step:07d}")
        shown.save(step, state)

    if sink is not None:
        sink.open()
    try:
        trainer.fit(batches, Hooks(report=report, save=save))
    finally:
        if sink is not None:
            sink.close()


def train_ray(params: Params, phase: int, start: Start = NO_START, fresh: bool = False,
              address: str = "", fault: Fault | None = None, sink: Sink | None = None) -> Path:
    """Train one phase on Ray Train and export the model to the phase's output folder."""
    skipped = pass_through(params, phase, start)
    if skipped is not None:
        return skipped
    t, r = params.train, params.ray
    steps = t.steps[phase - 1]
    init = phase_weights(params, phase, start)
    name = run_name(params, phase, start, workers=r.num_workers)
    root, fs = storage(params)
    store = RunStore(fs, f"{root}/{name}")
    if fresh:
        store.delete()
    state = store.newest()
    if state is not None and state["step"] == steps:  # finished before: export again
        print(f"phase {phase}: {name} already finished, exporting its final checkpoint",
              file=sys.stderr)
        return finish(params, phase, state, name, start)
    attempt = f"attempt-{len(store.attempts()) + 1:03d}"
    connect(address or r.address)
    return _fit(params, phase, start, init, name, store, attempt, fault, sink)


def _fit(params: Params, phase: int, start: Start, init: Any, name: str, store: RunStore,
         attempt: str, fault: Fault | None, sink: Sink | None) -> Path:
    import ray.train
    from ray.train import CheckpointConfig

    t, r = params.train, params.ray
    trainer = torch_trainer(
        _worker, params, {"phase": phase, "init": init, "fault": fault, "store": store,
                          "sink": sink}, attempt, store.root, store.fs,
        checkpoint_config=CheckpointConfig(num_to_keep=t.keep_checkpoints))
    print(f"phase {phase}: Ray Train run {name}/{attempt} ({r.num_workers} worker(s)) -> "
          f"{r.storage_path}", file=sys.stderr)
    try:
        trainer.fit()
    except ray.train.TrainingFailedError as exc:  # e.g. nodes lost beyond max_failures
        raise TransientError(f"phase {phase}: Ray Train run {name} failed after "
                             f"{r.max_failures} restart(s): {_first_line(exc)}") from exc
    state = store.newest()
    if state is None or state["step"] != t.steps[phase - 1]:
        raise FusionError(f"phase {phase}: Ray Train run {name} ended without its final "
                          "checkpoint")
    store.prune(attempt, t.keep_checkpoints)
    return finish(params, phase, state, name, start)


def _first_line(exc: BaseException) -> str:
    text = str(exc).strip()
    return text.splitlines()[0] if text else type(exc).__name__

