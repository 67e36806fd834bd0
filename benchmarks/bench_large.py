"""`fusion fuse` of one large pair: wall time and peak memory against image size.

Each size runs the real CLI in its own process (so the peak RSS is that run's alone) on a
synthetic pair written as PNG: a smooth random texture, so the files stay small while the
network sees real structure. A run over ``--timeout`` seconds is killed and shown as such.
Sizes up to ``--exact-pixels`` (default 1 MP) are fused exactly, larger ones in windows.
Usage: python benchmarks/bench_large.py [--mp 1 6 12 25 49] [--model DIR] [--timeout 300]
       [--engine onnxruntime] [--fuse-arg=--exact-pixels=0 ...]
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
from PIL import Image

ROOT = Path(__file__).resolve().parents[1]


def write_pair(folder: Path, megapixels: float) -> tuple[Path, Path]:
    side = int(round((megapixels * 1e6) ** 0.5))
    rng = np.random.default_rng(0)
    paths = []
    for name in ("a", "b"):
        small = rng.random((side // 32 + 2, side // 32 + 2))
        big = Image.fromarray((small * 255).astype(np.uint8)).resize((side, side),
                                                                     Image.BILINEAR)
        paths.append(folder / f"{name}.png")
        big.save(paths[-1])
    return paths[0], paths[1]


def run(command: list[str], timeout: float) -> tuple[float, float, int | None]:
    """(seconds, peak RSS MiB, exit code or None when killed at the timeout)."""
    start = time.perf_counter()
    proc = subprocess.Popen(command, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = start + timeout
    while True:
        pid, status, usage = os.wait4(proc.pid, os.WNOHANG)
        if pid:
            return time.perf_counter() - start, usage.ru_maxrss / 1024, os.waitstatus_to_exitcode(
                status)
        if time.perf_counter() > deadline:
            proc.kill()
            _, _, usage = os.wait4(proc.pid, 0)
            return time.perf_counter() - start, usage.ru_maxrss / 1024, None
        time.sleep(0.2)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--mp", type=float, nargs="+", default=[1, 6, 12, 25, 49])
    parser.add_argument("--model", default=str(ROOT / "fusion/models/dae_fuse/pretrained"))
    parser.add_argument("--timeout", type=float, default=300)
    parser.add_argument("--set", dest="overrides", action="append", default=[])
    parser.add_argument("--engine", choices=("torch", "onnxruntime"), default="torch")
    parser.add_argument("--fuse-arg", dest="fuse_args", action="append", default=[],
                        help="passed to `fusion fuse` (repeatable)")
    args = parser.parse_args()
    rows = []
    with tempfile.TemporaryDirectory() as scratch:
        model = args.model
        if args.engine == "onnxruntime":  # the file serve and batch fusion load
            model = str(Path(scratch) / "model.onnx")
            subprocess.run([sys.executable, "-m", "fusion.cli", "export", "--model",
                            args.model, "--onnx", model], check=True,
                           stdout=subprocess.DEVNULL)
        for mp in args.mp:
            a, b = write_pair(Path(scratch), mp)
            out = Path(scratch) / "fused.png"
            command = [sys.executable, "-m", "fusion.cli", "fuse", "--model", model,
                       "--engine", args.engine, "--a", str(a), "--b", str(b), "-o", str(out),
                       *args.fuse_args, *[f"--set={o}" for o in args.overrides]]
            seconds, rss, code = run(command, args.timeout)
            rows.append((mp, seconds, rss, "killed at timeout" if code is None else code))
            print(f"{mp:g} MP: {seconds:.1f} s, {rss:.0f} MiB, exit {rows[-1][3]}",
                  file=sys.stderr)
    load = os.getloadavg()[0]
    print(f"`fusion fuse` of one synthetic square pair, model {args.model}, engine "
          f"{args.engine} {' '.join(args.fuse_args)}, threads: "
          f"{os.environ.get('OMP_NUM_THREADS', 'default (all cores)')}, "
          f"{os.cpu_count()} CPUs, load average at the end {load:.2f}\n")
    print("| megapixels | seconds | peak RSS MiB | exit |")
    print("|---:|---:|---:|---|")
    for mp, seconds, rss, code in rows:
        print(f"| {mp:g} | {seconds:.1f} | {rss:.0f} | {code} |")


if __name__ == "__main__":
    main()
