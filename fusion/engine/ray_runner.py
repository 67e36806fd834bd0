"""Both training phases on Ray Train: the single-process loop, run by every DDP worker.

The driver connects to a cluster (``ray.address``, ``$RAY_ADDRESS`` or a local instance),
starts a ``TorchTrainer`` named after the stage and a hash of its configuration, and turns
the final checkpoint into the stage's exported model. Checkpoints go to
``ray.storage_path`` (a folder or ``s3://bucket/prefix``); rerunning the same configuration
resumes from the last one (Ray Train restores a run by name), and workers that die are
restarted from it up to ``ray.max_failures`` times.
"""

from __future__ import annotations

import io
import os
import sys
import tempfile
import warnings
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any
from urllib.parse import urlparse

# Under `uv run`, Ray would start workers with `uv run` in a copy of the working directory
# (a fresh environment per node, and no gitignored data). Workers use the installed
# environment instead; read when Ray is first imported.
os.environ.setdefault("RAY_ENABLE_UV_RUN_RUNTIME_ENV", "0")

import pyarrow.fs as pafs  # noqa: E402
import ray  # noqa: E402
import ray.train  # noqa: E402
import ray.train.torch  # noqa: E402
import torch  # noqa: E402
from ray.train import CheckpointConfig, FailureConfig, RunConfig, ScalingConfig  # noqa: E402

from fusion.checkpoint import STATE_FILE, load_state, load_weights, save_state
from fusion.data import PatchStream
from fusion.errors import FusionError, TransientError
from fusion.params import Params
from fusion.runs import finish, phase1_init, progress, run_name
from fusion.train import Hooks, Trainer


@dataclass(frozen=True)
class Fault:
    """Chaos hook for tests and drills: worker ``rank`` exits hard at ``step``, once
    (``marker`` is created on the first hit and disarms the fault)."""

    step: int
    marker: str
    rank: int = 0


def storage(params: Params) -> tuple[str, pafs.FileSystem]:
    """(path, filesystem) for Ray's ``storage_path``: S3 (endpoint configurable) or local."""
    path = params.ray.storage_path
    url = urlparse(path)
    if url.scheme == "s3":
        endpoint = params.ray.storage_endpoint or os.environ.get("AWS_ENDPOINT_URL", "")
        options: dict[str, Any] = {"endpoint_override": endpoint} if endpoint else {}
        if endpoint.startswith("http://"):
            options["scheme"] = "http"
        region = os.environ.get("AWS_DEFAULT_REGION") or os.environ.get("AWS_REGION")
        if region:
            options["region"] = region
        return f"{url.netloc}{url.path}".rstrip("/"), pafs.S3FileSystem(**options)
    if url.scheme not in ("", "file"):
        raise FusionError(f"ray.storage_path {path!r}: only local folders and s3:// are supported")
    return str(Path(url.path if url.scheme else path).resolve()), pafs.LocalFileSystem()


def _final_state(fs: pafs.FileSystem, run: str, steps: int) -> dict[str, Any] | None:
    path = f"{run}/step-{steps:07d}/{STATE_FILE}"
    if fs.get_file_info(path).type != pafs.FileType.File:
        return None
    with fs.open_input_stream(path) as fh:
        data = io.BytesIO(fh.read())
    return torch.load(data, map_location="cpu", weights_only=True)


def connect(address: str = "") -> None:
    """Join ``address`` / ``$RAY_ADDRESS``, or start a local Ray instance."""
    if ray.is_initialized():
        return
    address = address or os.environ.get("RAY_ADDRESS", "")
    try:
        ray.init(address=address or None, logging_level="WARNING", log_to_driver=True)
    except (ConnectionError, RuntimeError) as exc:
        raise TransientError(f"cannot connect to the Ray cluster at {address!r}: {exc}") from exc


def scaling(params: Params) -> ScalingConfig:
    r = params.ray
    resources = {"CPU": r.cpus_per_worker, **({"GPU": r.gpus_per_worker} if r.use_gpu else {})}
    return ScalingConfig(num_workers=r.num_workers, use_gpu=r.use_gpu,
                         resources_per_worker=resources, placement_strategy=r.placement_strategy)


def shipped(params: Params) -> Params:
    """Params for workers, which may run elsewhere (another cwd, another node with a
    shared filesystem): the dataset path made absolute."""
    return replace(params, train=replace(params.train, data=str(Path(params.train.data).resolve())))


def _worker(config: dict[str, Any]) -> None:
    """One DDP worker: build the trainer, resume from Ray's checkpoint, run the shared loop."""
    warnings.filterwarnings("ignore", message="Grad strides do not match")  # DDP, harmless
    params: Params = config["params"]
    phase: int = config["phase"]
    fault: Fault | None = config["fault"]
    torch.set_num_threads(max(1, int(params.ray.cpus_per_worker)))  # Ray's default: 1
    ctx = ray.train.get_context()
    rank, world = ctx.get_world_rank(), ctx.get_world_size()
    trainer = Trainer(params, phase, ray.train.torch.get_device(), init=config["init"],
                      wrap=ray.train.torch.prepare_model)
    checkpoint = ray.train.get_checkpoint()
    if checkpoint is not None:
        with checkpoint.as_directory() as folder:
            trainer.load(load_state(folder))
    t = params.train
    stream = PatchStream(Path(t.data) / "patches", "train", t.batch_size, t.seed,
                         rank=rank, world=world, crop=t.crop)
    shown = progress(phase, trainer.steps) if rank == 0 else (lambda step, metrics: None)

    def batches(step: int):
        if fault and rank == fault.rank and step == fault.step and not Path(fault.marker).exists():
            Path(fault.marker).touch()
            print(f"fault injected: worker {rank} exits at step {step}", file=sys.stderr)
            os._exit(1)
        return stream.batch(step)

    def report(step: int, metrics: dict[str, float]) -> None:
        shown(step, metrics)
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

    trainer.fit(batches, Hooks(report=report, save=save))


def train_ray(params: Params, phase: int, fresh: bool = False, address: str = "",
              fault: Fault | None = None) -> Path:
    """Train one phase on Ray Train and export the model to the phase's output folder."""
    t, r = params.train, params.ray
    init = load_weights(phase1_init(params)) if phase == 2 else None
    name = run_name(params, phase, workers=r.num_workers)
    root, fs = storage(params)
    if fresh:
        info = fs.get_file_info(f"{root}/{name}")
        if info.type != pafs.FileType.NotFound:
            fs.delete_dir(f"{root}/{name}")
    elif isinstance(fs, pafs.LocalFileSystem):
        Path(root).mkdir(parents=True, exist_ok=True)
    final = _final_state(fs, f"{root}/{name}", t.phase1_steps if phase == 1 else t.phase2_steps)
    if final is not None:  # finished before: export again without starting workers
        print(f"phase {phase}: {name} already finished, exporting its final checkpoint",
              file=sys.stderr)
        return finish(params, phase, final, name)
    connect(address or r.address)
    trainer = ray.train.torch.TorchTrainer(
        _worker,
        train_loop_config={"params": shipped(params), "phase": phase, "init": init,
                           "fault": fault},
        scaling_config=scaling(params),
        run_config=RunConfig(
            name=name, storage_path=root, storage_filesystem=fs,
            checkpoint_config=CheckpointConfig(num_to_keep=t.keep_checkpoints),
            failure_config=FailureConfig(max_failures=r.max_failures)))
    print(f"phase {phase}: Ray Train run {name} ({r.num_workers} worker(s)) -> "
          f"{r.storage_path}", file=sys.stderr)
    try:
        result = trainer.fit()
    except ray.train.TrainingFailedError as exc:  # e.g. nodes lost beyond max_failures
        raise TransientError(f"phase {phase}: Ray Train run {name} failed after "
                          f"{r.max_failures} restart(s): {exc}") from exc
    if result.checkpoint is None:
        raise FusionError(f"phase {phase}: Ray Train run {name} left no checkpoint")
    with result.checkpoint.as_directory() as folder:
        state = load_state(folder)
    if state["step"] != (t.phase1_steps if phase == 1 else t.phase2_steps):
        raise FusionError(f"phase {phase}: final checkpoint of {name} is at step {state['step']}")
    return finish(params, phase, state, name)

