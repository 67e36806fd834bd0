"""Batch fusion of the 25 TNO pairs (768x576 and others) with one model, in pairs/s:
one local process (`fusion fuse` folder mode, onnxruntime), `fusion fuse --ray` on a
1-node cluster and on a 2-node cluster (two `ray start` nodes on this machine), and where
the time of a cluster run goes (the driver's start, the actors' start, the workers' own
seconds per pair from the output manifest, the rest).

Usage: python benchmarks/bench_batch.py [--model DIR] [--workers 2]
"""

from __future__ import annotations

import argparse
import os
import secrets
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
TNO = ROOT.parent / "shared" / "data" / "tno"
RAY = str(Path(sys.executable).with_name("ray"))


def fuse(*args: str, env: dict | None = None) -> float:
    """Seconds of one `fusion fuse` command, start to exit."""
    t0 = time.perf_counter()
    subprocess.run([sys.executable, "-m", "fusion.cli", "--quiet", "fuse", *args], cwd=ROOT,
                   env={**os.environ, **(env or {})}, check=True, capture_output=True)
    return time.perf_counter() - t0


def cluster(nodes: int, cpus: int, work: Path) -> tuple[str, list[subprocess.Popen]]:
    """``nodes`` `ray start` processes on this machine with ``cpus`` logical CPUs each."""
    port = 6390
    procs = [subprocess.Popen([RAY, "start", "--head", "--block", f"--port={port}",
                               f"--num-cpus={cpus}", f"--temp-dir={work}/ray0",
                               "--include-dashboard=false", "--disable-usage-stats"],
                              stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                              start_new_session=True)]
    time.sleep(15)
    for n in range(1, nodes):
        procs.append(subprocess.Popen([RAY, "start", "--block", f"--address=127.0.0.1:{port}",
                                       f"--num-cpus={cpus}", f"--temp-dir={work}/ray{n}",
                                       "--disable-usage-stats"], stdout=subprocess.DEVNULL,
                                      stderr=subprocess.DEVNULL, start_new_session=True))
    time.sleep(10 * (nodes - 1))
    return f"127.0.0.1:{port}", procs


def stop(procs: list[subprocess.Popen]) -> None:
    import signal

    for proc in reversed(procs):
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait()


def worker_seconds(out: Path) -> float:
    import pyarrow.parquet as pq

    return sum(pq.read_table(out / "manifest").column("seconds").to_pylist())


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default=str(ROOT / "fusion/models/dae_fuse/pretrained"))
    parser.add_argument("--workers", type=int, default=2)
    args = parser.parse_args()
    # the clusters below use Ray's token authentication, as the tests' do: one token,
    # shared by the `ray start` nodes and the driver through the environment
    os.environ.setdefault("RAY_AUTH_MODE", "token")
    os.environ.setdefault("RAY_AUTH_TOKEN", secrets.token_hex(32))
    work = Path(tempfile.mkdtemp(prefix="bench-batch-"))
    onnx = work / "model.onnx"
    subprocess.run([sys.executable, "-m", "fusion.cli", "export", "--model", args.model,
                    "--onnx", str(onnx)], cwd=ROOT, check=True, capture_output=True)
    pairs = len(list((TNO / "ir").iterdir()))
    common = ["--model", str(onnx), "--a", str(TNO / "ir"), "--b", str(TNO / "vi")]
    rows = [("one process (folder mode, 2 threads)",
             fuse(*common, "--engine", "onnxruntime", "--threads", "2", "-o",
                  str(work / "local")), None)]
    env = {"RAY_ENABLE_UV_RUN_RUNTIME_ENV": "0"}
    for nodes in (1, 2):
        address, procs = cluster(nodes, 2, work / f"c{nodes}")
        out = work / f"ray{nodes}"
        try:
            seconds = fuse(*common, "--ray", "--address", address, "-o", str(out), "--set",
                           f"batch.workers={args.workers}", "--set",
                           f"batch.cpus_per_worker={2 * nodes // args.workers or 1}",
                           env=env)
        finally:
            stop(procs)
        rows.append((f"--ray, {nodes}-node cluster ({args.workers} workers)", seconds,
                     worker_seconds(out)))
    print(f"machine: {os.cpu_count()} cores (both clusters share them), load average "
          f"{os.getloadavg()[0]:.1f} at the end; {pairs} TNO pairs\n")
    print("| setup | seconds | pairs/s | workers' own seconds (sum) |")
    print("|---|---:|---:|---:|")
    for name, seconds, own in rows:
        own_cell = f"{own:.1f}" if own is not None else "-"
        print(f"| {name} | {seconds:.1f} | {pairs / seconds:.2f} | {own_cell} |")


if __name__ == "__main__":
    main()
