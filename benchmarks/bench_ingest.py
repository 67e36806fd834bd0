"""Can the input keep up with training? Ray Data ingest in patches/s, from a local folder and
from S3, into 1 and 2 consumers, beside the training step rate here, and an estimate of the
feed the GPU profile (flows/profiles/gpu.yaml) needs on one GPU.

- Ingest: the training split (params.yaml's patch size) read with `read_patches` (as a
  run reads it), split with `streaming_split(n, equal=True)` (as Ray Train's DataConfig
  splits it) and consumed by n Ray tasks of one CPU each through `ShardBatches`, the
  training workers' own batching (local shuffle, decode, flips): every cost but the model.
  S3 is a moto server in its own process on loopback (`moto_server`), so it is a Python
  server on the same 2 cores: a real store is faster, not slower.
- Training: steady patches/s of the params.yaml model's phase 1 (one process, 1 torch
  thread per CPU of a Ray worker), batch `train.batch_size`.
- GPU estimate: FLOPs of one phase-1 training step at the GPU profile's batch size
  (torch's FlopCounterMode: convolutions and matrix products, forward and backward)
  divided by assumed sustained throughputs (--gpu-tflops; default 10, 30 and 100, i.e.
  1-10% of an H100's dense bf16 peak of about 990: small conv/attention nets on 128x128
  patches at batch 16 sit at the low end; kernel launch latency is ignored, so each is an
  upper bound of the step rate, the hardest feed), plus a launch floor: the aten operator
  calls of one step (a TorchDispatchMode count) times --us-per-op (default 10 us: eager
  dispatch plus kernel launch, which bounds small nets on fast GPUs), against what one
  consumer ingests.

Usage: python benchmarks/bench_ingest.py [--epochs 3] [--gpu-tflops 100] [--set k=v ...]"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
import tempfile
import time
from dataclasses import replace
from pathlib import Path

import torch
import yaml

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
from fusion.data.prepare import prepare  # noqa: E402
from fusion.data.prepared import publish, source  # noqa: E402
from fusion.engine.batches import PatchStream, ShardBatches  # noqa: E402
from fusion.engine.cluster import connect, read_patches  # noqa: E402
from fusion.engine.trainer import Trainer  # noqa: E402
from fusion.params import Params, load_params  # noqa: E402


def consume(shard, batch: int, seed: int, crop: int, size: int, rows: int, world: int,
            epochs: int) -> tuple[int, float, float]:
    """(patches, seconds of the first epoch, seconds of the rest) of one consumer."""
    batches = ShardBatches(shard, batch, seed, crop, size, rows, world)
    start = time.perf_counter()
    first = 0.0
    for step in range(epochs * batches.steps_per_epoch):
        batches.batch(step)
        if step == batches.steps_per_epoch - 1:
            first = time.perf_counter() - start
    return epochs * batches.steps_per_epoch * batch, first, time.perf_counter() - start - first


def ingest(params: Params, uri: str, endpoint: str, workers: int, epochs: int) -> float:
    """Steady patches/s (epochs after the first) of ``workers`` consumers."""
    import ray

    src = source(uri, endpoint)
    size, rows = src.layout("train")
    ray.data.DataContext.get_current().execution_options.preserve_order = True
    shards = read_patches(src).streaming_split(workers, equal=True)
    t = params.train
    task = ray.remote(num_cpus=1)(consume)
    results = ray.get([task.remote(s, t.batch_size, t.seed, t.crop, size, rows, workers, epochs)
                       for s in shards])
    patches = sum(r[0] for r in results) * (epochs - 1) / epochs
    return patches / max(r[2] for r in results)


def train_rate(params: Params, data: str, steps: int = 12) -> float:
    """Steady training patches/s of phase 1 in this process."""
    params = replace(params, train=replace(params.train, data=data, steps=[steps, steps],
                                           log_every=1, checkpoint_every=10**9))
    stream = PatchStream(data, "train", params.train.batch_size, params.train.seed)
    trainer = Trainer(params, 1)
    trainer.fit(stream.batch)
    times = [row["time"] for row in trainer.curve]
    return params.train.batch_size * (len(times) - 3) / (times[-1] - times[2])


def step_cost(params: Params, data: str, batch: int) -> tuple[float, int]:
    """(FLOPs, aten operator calls) of one phase-1 training step (generator, critic and
    their optimizers) at ``batch``; on a GPU each call is at least one kernel launch."""
    from torch.utils._python_dispatch import TorchDispatchMode
    from torch.utils.flop_counter import FlopCounterMode

    class Calls(TorchDispatchMode):
        count = 0

        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            Calls.count += 1
            return func(*args, **(kwargs or {}))

    params = replace(params, train=replace(params.train, batch_size=batch))
    a, b = PatchStream(data, "train", batch, 0).batch(0)
    trainer = Trainer(params, 1)
    trainer.train_step(a, b)  # first step: optimizer state is created
    with FlopCounterMode(display=False) as counter, Calls():
        trainer.train_step(a, b)
    return float(counter.get_total_flops()), Calls.count


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--epochs", type=int, default=3)
    parser.add_argument("--gpu-tflops", type=float, nargs="+", default=[10.0, 30.0, 100.0])
    parser.add_argument("--us-per-op", type=float, default=10.0)
    parser.add_argument("--set", dest="overrides", action="append", default=[])
    args = parser.parse_args()
    for key in ("AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY"):
        os.environ.setdefault(key, "testing")
    os.environ.setdefault("AWS_DEFAULT_REGION", "us-east-1")
    torch.set_num_threads(1)
    base = load_params(overrides=args.overrides)
    tmp = Path(tempfile.mkdtemp(prefix="bench-ingest-"))
    data = replace(base.data, out=str(tmp / "prepared"), summary=str(tmp / "prepare.json"))
    prepare(data)
    params = replace(base, data=data)
    port = 45000 + os.getpid() % 10000
    moto = subprocess.Popen([str(Path(sys.executable).with_name("moto_server")), "-H",
                             "127.0.0.1", "-p", str(port)], stdout=subprocess.DEVNULL,
                            stderr=subprocess.DEVNULL)
    endpoint = f"http://127.0.0.1:{port}"
    try:
        import boto3

        for _ in range(50):
            try:
                boto3.client("s3", endpoint_url=endpoint).create_bucket(Bucket="bench")
                break
            except Exception:  # noqa: BLE001 (the server is starting)
                time.sleep(0.2)
        publish(data.out, "s3://bench/prepared", endpoint)
        connect("")
        rows = []
        for name, uri in (("local folder", data.out), ("S3 (moto)", "s3://bench/prepared")):
            for workers in (1, 2):
                rate = ingest(params, uri, endpoint, workers, args.epochs)
                rows.append((name, workers, rate))
                print(f"{name}, {workers} consumer(s): {rate:.0f} patches/s", flush=True)
        training = train_rate(params, data.out)
        profile = yaml.safe_load((ROOT / "flows/profiles/gpu.yaml").read_text())
        gpu_batch = int(profile["train"]["batch_size"])
        flops, calls = step_cost(params, data.out, gpu_batch)
    finally:
        moto.terminate()
        moto.wait()
    load = os.getloadavg()[0]
    print(f"\n{data.patch_size}x{data.patch_size} patches, batch {base.train.batch_size}, "
          f"{args.epochs} epochs (first left out), 1 CPU and 1 torch thread per consumer, "
          f"{os.cpu_count()} cores, load {load:.1f}\n")
    print("| input | consumers | ingest patches/s |")
    print("|---|---:|---:|")
    for name, workers, rate in rows:
        print(f"| {name} | {workers} | {rate:.0f} |")
    print(f"\ntraining, phase 1 of the params.yaml model on 1 CPU thread: {training:.1f} "
          f"patches/s\nGPU profile: {flops / 1e9:.1f} GFLOPs per phase-1 step at batch "
          f"{gpu_batch} (FlopCounterMode: convolutions and matmuls, forward + backward)\n")
    feed = rows[0][2]  # one consumer: a training worker's own feed
    launch = calls * args.us_per_op * 1e-6
    print(f"{calls} operator calls per step: at {args.us_per_op:g} us each (eager dispatch and "
          f"kernel launch) a step takes at least {launch * 1e3:.1f} ms, at most "
          f"{1 / launch:.0f} steps/s\n")
    print("| assumed sustained TFLOP/s | steps/s (FLOPs, launches) | patches/s to feed | "
          "one consumer's feed |")
    print("|---:|---:|---:|---|")
    for tflops in args.gpu_tflops:
        steps = 1 / (flops / (tflops * 1e12) + launch)
        verdict = "keeps up" if feed >= steps * gpu_batch else "input-bound"
        print(f"| {tflops:g} | {steps:.0f} | {steps * gpu_batch:.0f} | {feed:.0f}/s: {verdict} |")


if __name__ == "__main__":
    main()
