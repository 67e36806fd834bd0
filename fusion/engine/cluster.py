"""Joining or starting Ray, and what every Ray Train worker sets up first.

Ray is imported here, on first use, never when the package is imported. With no address
configured (``--address``, ``ray.address``, ``$RAY_ADDRESS``) a run starts its own local
instance (``address="local"``), so a stale session file of a dead cluster never turns
into a failed connection.
"""

from __future__ import annotations

import logging
import os
import sys
from dataclasses import replace
from pathlib import Path
from typing import Any

from fusion.data.prepared import source
from fusion.errors import TransientError
from fusion.files import filesystem
from fusion.params import Params

QUIET_LOGGERS = ("ray.train", "ray.tune", "ray.data", "ray.autoscaler",
                 "ray.train.v2._internal.execution.preemption")
WORKER_ENV = {
    # workers use the installed environment, not a `uv run` copy of the working directory
    "RAY_ENABLE_UV_RUN_RUNTIME_ENV": "0",
    # one actor process less per run; a spot-instance notice is of no use here
    "RAY_TRAIN_ENABLE_PREEMPTION_WATCHER": "0",
    # keep idle worker processes for a minute instead of a second: Ray Data's short tasks
    # otherwise start a new Python process (seconds of CPU on a small node) again and again
    "RAY_idle_worker_killing_time_threshold_ms": "60000",
    # Ray Train V2 replaces `print` on its workers with a tee into its logger, which the
    # console handler prints again: every step line appeared twice
    "RAY_TRAIN_ENABLE_PRINT_PATCH": "0",
    # Ray Data's INFO lines (execution plans, "execution finished") filled the flow logs
    "RAY_DATA_LOG_LEVEL": "WARNING",
    # Ray Serve's HTTP proxy must answer its readiness check within 5 s by default: a new
    # proxy process on a busy 2-core node took longer to import, was killed and restarted
    # over and over, and `fusion serve` gave up
    "RAY_SERVE_PROXY_READY_CHECK_TIMEOUT_S": "60",
}


def connect(address: str = "") -> str:
    """Join ``address`` (else ``$RAY_ADDRESS``) or start a local Ray instance; returns the
    address joined ("local" for a new instance). Safe to call twice."""
    for key, value in WORKER_ENV.items():
        os.environ.setdefault(key, value)
    if not sys.stderr.isatty():  # no colour codes in a log file: Ray colours the worker
        # prefix of forwarded lines, and the note on lines it merged across workers
        os.environ.setdefault("RAY_COLOR_PREFIX", "0")
        os.environ.setdefault("RAY_DEDUP_LOGS", "0")
    import ray

    for name in QUIET_LOGGERS:
        logging.getLogger(name).setLevel(logging.WARNING)
    address = address or os.environ.get("RAY_ADDRESS", "")
    if ray.is_initialized():
        return address or "local"
    # a cluster started elsewhere (`ray start`) did not inherit WORKER_ENV: the job's
    # runtime environment carries it to this job's workers
    options = ({"runtime_env": {"env_vars": WORKER_ENV}} if address
               else {"num_cpus": local_cpus()})
    try:
        ray.init(address=address or "local", logging_level="WARNING", log_to_driver=True,
                 **options)
    except (ConnectionError, RuntimeError, ValueError) as exc:
        raise TransientError(f"cannot connect to the Ray cluster at {address!r}: {exc}") from exc
    return address or "local"


def local_cpus() -> int:
    """Logical CPUs of a local instance: the cores plus one, which Ray Data's Parquet
    metadata task needs while the training workers hold every core (it only reads
    footers)."""
    return (os.cpu_count() or 1) + 1


def storage(params: Params) -> tuple[str, Any]:
    """(path, pyarrow filesystem) of ``ray.storage_path``: S3 (custom endpoint, bounded
    retries with backoff) or a local folder."""
    return filesystem(params.ray.storage_path, params.ray.storage_endpoint, "ray.storage_path")


def run_config(name: str, root: str, fs: Any, max_failures: int, **options: Any) -> Any:
    """A Ray Train ``RunConfig``: its own log lines only at ERROR (the loop prints the
    steps once; Ray would repeat every report at INFO), restarts up to ``max_failures``."""
    import ray.train

    return ray.train.RunConfig(name=name, storage_path=root, storage_filesystem=fs,
                               failure_config=ray.train.FailureConfig(max_failures=max_failures),
                               logging_config=ray.train.LoggingConfig(log_level="ERROR"),
                               **options)


def read_patches(src: Any, columns: list[str] | None = None) -> Any:
    """The training split of a patch source (``fusion.data.prepared.source``) as a Ray
    Data dataset. Read tasks take no CPU slot (the workers hold the CPUs; reading Parquet is
    I/O) and run one at a time (CPU-free tasks are otherwise unbounded; one keeps up with
    training). Ray Data's first Parquet reader is used: the newer one (the default in Ray
    2.60) starts 32 footer-reader actors, each a new Python process, to list even one file,
    which took 45-50 s of every run's start-up on 2 cores. No progress bars: the training
    loop prints its steps, and the bars filled the logs (the dataset keeps this context)."""
    import ray.data

    from fusion.engine.batches import COLUMNS

    ctx = ray.data.DataContext.get_current()
    saved = ctx.use_datasource_v2, ctx.enable_progress_bars
    ctx.use_datasource_v2 = ctx.enable_progress_bars = False
    try:
        return ray.data.read_parquet(src.files("train"), filesystem=src.fs,
                                     columns=columns or COLUMNS,
                                     num_cpus=0, concurrency=1)
    finally:
        ctx.use_datasource_v2, ctx.enable_progress_bars = saved


def train_dataset(params: Params) -> tuple[dict[str, Any], dict[str, Any], Any]:
    """The training split as a Ray Data dataset read from ``train.data`` (a folder or
    ``s3://``): (``datasets=`` for the TorchTrainer, what workers need to read it, its
    ``DataConfig``)."""
    import ray.data
    import ray.train

    src = source(params.train.data, params.ray.storage_endpoint)
    size, rows = src.layout("train")
    options = ray.data.ExecutionOptions(preserve_order=True)
    return ({"train": read_patches(src)}, {"patch_size": size, "rows": rows, "data": src.uri},
            ray.train.DataConfig(datasets_to_split=["train"], execution_options=options))


def scaling(params: Params) -> Any:
    from ray.train import ScalingConfig

    r = params.ray
    resources = {"CPU": r.cpus_per_worker, **({"GPU": r.gpus_per_worker} if r.use_gpu else {})}
    return ScalingConfig(num_workers=r.num_workers, use_gpu=r.use_gpu,
                         resources_per_worker=resources, placement_strategy=r.placement_strategy)


def shipped(params: Params) -> Params:
    """Params for workers, which may run elsewhere (another cwd, another environment): a
    local dataset path and the teacher's folder made absolute (an s3:// dataset is read by
    every node as it is; a teacher must be readable at that path on every node), and
    the S3 endpoint this process resolves (``$AWS_ENDPOINT_URL`` when
    ``ray.storage_endpoint`` is empty) written in: a node started without that variable
    would otherwise look for the bucket on AWS."""
    from fusion.s3 import s3_endpoint

    t, r = params.train, params.ray
    data = t.data if "://" in t.data else str(Path(t.data).resolve())
    teacher = str(Path(t.teacher).resolve()) if t.teacher else ""
    return replace(params, train=replace(t, data=data, teacher=teacher),
                   ray=replace(r, storage_endpoint=s3_endpoint(r.storage_endpoint)))


def torch_trainer(loop: Any, params: Params, config: dict[str, Any], name: str, root: str,
                  fs: Any, **run_options: Any) -> Any:
    """A ``TorchTrainer`` running ``loop`` on ``ray.num_workers`` workers, fed the training
    split of ``train.data`` through Ray Data. The loop's config gets the shipped params
    (``params``) and what its workers need to read their shard (``layout``)."""
    import ray.train.torch

    params = shipped(params)
    datasets, layout, data_config = train_dataset(params)
    return ray.train.torch.TorchTrainer(
        loop, train_loop_config={**config, "params": params, "layout": layout},
        scaling_config=scaling(params), datasets=datasets, dataset_config=data_config,
        run_config=run_config(name, root, fs, params.ray.max_failures, **run_options))


def worker_start(config: dict[str, Any]) -> tuple[Params, int, int, Any, Any]:
    """What every Ray Train worker (training or a search trial) does first: torch threads
    from ``ray.cpus_per_worker`` (Ray's default is 1), quiet logs; returns (params, rank,
    world size, device, this worker's batches from its shard of the training data)."""
    import warnings

    import ray.train
    import ray.train.torch
    import torch

    from fusion.engine.batches import ShardBatches

    params: Params = config["params"]
    warnings.filterwarnings("ignore", message="Grad strides do not match")  # DDP, harmless
    for name in QUIET_LOGGERS:
        logging.getLogger(name).setLevel(logging.WARNING)
    # Ray Train's "Reporting training result" INFO line comes from a logger named by its
    # file path, outside `ray.train`, so LoggingConfig's level misses it; the loop's own
    # lines are printed, not logged
    logging.getLogger().setLevel(logging.WARNING)
    torch.set_num_threads(max(1, int(params.ray.cpus_per_worker)))
    ctx = ray.train.get_context()
    world = ctx.get_world_size()
    t, layout = params.train, config["layout"]
    batches = ShardBatches(ray.train.get_dataset_shard("train"), t.batch_size, t.seed, t.crop,
                           layout["patch_size"], layout["rows"], world)
    return params, ctx.get_world_rank(), world, ray.train.torch.get_device(), batches
