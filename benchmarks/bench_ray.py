"""Ray Train cost on this machine: patches/s with 1 and 2 CPU workers (and 1 GPU when there
is one), and the time from submitting a run to its first finished step (Ray overhead).

Usage: python benchmarks/bench_ray.py [--steps N] [--set k=v ...]. Trains phase I of the
params.yaml model on the bundled sample (prepared into a temp folder, 128x128 patches)."""

from __future__ import annotations

import argparse
import sys
import tempfile
import time
from dataclasses import replace
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from fusion.data.prepare import prepare  # noqa: E402
from fusion.engine.cluster import connect  # noqa: E402
from fusion.engine.ray_runner import train_ray  # noqa: E402
from fusion.params import load_params  # noqa: E402


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--steps", type=int, default=30)
    parser.add_argument("--log-every", type=int, default=5)
    parser.add_argument("--set", dest="overrides", action="append", default=[])
    args = parser.parse_args()
    base = load_params(overrides=args.overrides)
    tmp = Path(tempfile.mkdtemp(prefix="bench-ray-"))
    data = replace(base.data, out=str(tmp / "prepared"), summary=str(tmp / "prepare.json"))
    prepare(data)
    t0 = time.perf_counter()
    connect(base.ray.address)
    print(f"ray.init: {time.perf_counter() - t0:.1f} s")
    # (workers, CPUs per worker, GPU); Ray sets each worker's torch threads to its CPUs
    setups = [(1, 1.0, False), (1, 2.0, False), (2, 1.0, False)]
    setups += [(1, 1.0, True)] if torch.cuda.is_available() else []
    rows = []
    for workers, cpus, gpu in setups:
        out = tmp / f"w{workers}c{cpus:g}{'g' if gpu else ''}"
        train = replace(base.train, data=data.out, steps=[args.steps, args.steps],
                        log_every=args.log_every, checkpoint_every=args.steps,
                        out=str(out / "models"), curves=str(out), init="")
        ray = replace(base.ray, num_workers=workers, use_gpu=gpu, cpus_per_worker=cpus,
                      storage_path=str(out / "ck"))
        params = replace(base, data=data, train=train, ray=ray)
        submit = time.time()
        train_ray(params, 1)
        end = time.time()
        lines = (out / "phase1_curve.csv").read_text().splitlines()
        header = lines[0].split(",")
        times = [float(line.split(",")[header.index("time")]) for line in lines[1:]]
        # steady state: from the first logged step to the last (skips warm-up)
        steady = args.log_every * (len(times) - 1) / (times[-1] - times[0])
        patches = steady * train.batch_size * workers
        kind = "GPU" if gpu else f"CPU x {cpus:g} cores"
        rows.append((f"{workers} worker(s), {kind}", patches,
                     times[0] - submit, end - submit))
    print(f"\nphase I, {args.steps} steps, batch {base.train.batch_size} per worker, "
          f"{base.data.patch_size}x{base.data.patch_size} patches\n")
    print("| setup | patches/s (steady) | submit -> first step s | submit -> exported s |")
    print("|---|---:|---:|---:|")
    for name, patches, first, total in rows:
        print(f"| {name} | {patches:.1f} | {first:.1f} | {total:.1f} |")


if __name__ == "__main__":
    main()
