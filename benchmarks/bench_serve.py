"""`fusion serve` under load: p50/p99 latency and pairs/s of 768x576 pairs (TNO 01, the PNG
files) with 1 and 2 replicas and 1, 4 and 16 concurrent HTTP clients, beside the rate of one
process fusing in a loop with the same onnxruntime engine (no HTTP, no Serve).

The model is a registered version of --model (default: the bundled DAE-Fuse checkpoint) in
a throwaway SQLite registry; Ray is a local instance; each replica has
--cpus-per-replica CPUs (its onnxruntime threads).
Usage: python benchmarks/bench_serve.py [--requests 24] [--cpus-per-replica 1]
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import tempfile
import threading
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
TNO = ROOT.parent / "shared" / "data" / "tno"
sys.path.insert(0, str(ROOT))


def register(model: str, workdir: Path) -> str:
    """A one-version registry in ``workdir``; returns its tracking URI."""
    import mlflow
    from mlflow import MlflowClient

    import fusion.models  # noqa: F401
    from fusion.engine.exports import load_model, read_config
    from fusion.family import get_family
    from fusion.inference.onnx import export_onnx
    from fusion.mlops.pyfunc import ONNX, WEIGHTS, log_pyfunc

    uri = f"sqlite:///{workdir / 'mlflow.db'}"
    mlflow.set_tracking_uri(uri)
    mlflow.set_registry_uri(uri)
    family = read_config(model)["family"]
    onnx = export_onnx(load_model(model), get_family(family), workdir / "model.onnx")
    with mlflow.start_run():
        info = log_pyfunc({WEIGHTS: model, ONNX: str(onnx)})
    version = mlflow.register_model(info.model_uri, family).version
    MlflowClient().set_registered_model_alias(family, "champion", version)
    return uri


def load(url: str, body: dict, clients: int, total: int) -> tuple[list[float], float]:
    """``total`` requests from ``clients`` threads: (latencies, seconds of the whole)."""
    import requests

    latencies: list[float] = []
    lock = threading.Lock()
    left = [total]

    def client() -> None:
        session = requests.Session()
        while True:
            with lock:
                if left[0] == 0:
                    return
                left[0] -= 1
            t0 = time.perf_counter()
            answer = session.post(f"{url}/fuse", files=body, timeout=600)
            answer.raise_for_status()
            with lock:
                latencies.append(time.perf_counter() - t0)

    started = time.perf_counter()
    threads = [threading.Thread(target=client) for _ in range(clients)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    return latencies, time.perf_counter() - started


def single_process(onnx: Path, threads: int, repeat: int) -> float:
    """Pairs/s of one process fusing TNO 01 in a loop (files read and PNG encoded too)."""
    from fusion.data.images import encode_image, read_image
    from fusion.inference.fuse import fuse_images
    from fusion.inference.onnx import OnnxEngine

    engine = OnnxEngine.open(onnx, threads=threads)
    a, b = (TNO / side / "01.png" for side in ("ir", "vi"))
    encode_image(fuse_images(engine, read_image(a), read_image(b)).pixels, ".png")
    t0 = time.perf_counter()
    for _ in range(repeat):
        encode_image(fuse_images(engine, read_image(a), read_image(b)).pixels, ".png")
    return repeat / (time.perf_counter() - t0)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default=str(ROOT / "fusion/models/dae_fuse/pretrained"))
    parser.add_argument("--requests", type=int, default=24)
    parser.add_argument("--cpus-per-replica", type=float, default=1.0)
    args = parser.parse_args()
    os.environ["RAY_ENABLE_UV_RUN_RUNTIME_ENV"] = "0"
    from ray import serve

    from fusion.params import load_params
    from fusion.serving.app import APP, run

    work = Path(tempfile.mkdtemp(prefix="bench-serve-"))
    uri = register(args.model, work)
    a, b = ((TNO / side / "01.png").read_bytes() for side in ("ir", "vi"))
    body = {"a": ("ir.png", a), "b": ("vi.png", b)}
    rows = []
    for replicas in (1, 2):
        params = load_params(ROOT / "params.yaml", [
            f"mlflow.tracking_uri={uri}", f"serve.replicas={replicas}",
            f"serve.cpus_per_replica={args.cpus_per_replica}", "serve.port=8787",
            "serve.max_ongoing=16"])
        url = run(params)
        load(url, body, 1, 2)  # warm-up: every replica's first session
        for clients in (1, 4, 16):
            latencies, seconds = load(url, body, clients, args.requests)
            q = statistics.quantiles(latencies, n=100)
            rows.append((replicas, clients, q[49], q[98], len(latencies) / seconds))
        serve.delete(APP)
    serve.shutdown()
    threads = max(1, int(args.cpus_per_replica))
    alone = single_process(work / "model.onnx", threads, 8)
    print(f"machine: {os.cpu_count()} cores, load average {os.getloadavg()[0]:.1f} at the end; "
          f"onnxruntime threads per replica: {threads}\n")
    print("| replicas | clients | p50 s | p99 s | pairs/s |")
    print("|---:|---:|---:|---:|---:|")
    for replicas, clients, p50, p99, rate in rows:
        print(f"| {replicas} | {clients} | {p50:.2f} | {p99:.2f} | {rate:.2f} |")
    print(f"\none process, no HTTP ({threads} thread(s)): {alone:.2f} pairs/s")


if __name__ == "__main__":
    main()
