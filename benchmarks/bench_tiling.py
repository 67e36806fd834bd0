"""Exact tiled inference vs one whole-image pass: seconds, peak memory and the difference.

Each setup runs in its own process, so the peak RSS is that setup's alone.
Usage: python benchmarks/bench_tiling.py [--height 1536 --width 2048] [--set k=v ...]
"""

from __future__ import annotations

import argparse
import json
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from fusion.inference.fuse import TileSpec, TorchEngine  # noqa: E402
from fusion.models import create_model  # noqa: E402
from fusion.params import load_params  # noqa: E402

SETUPS = [("whole image", 1 << 30, 0), ("tiles 1024, halo 64", 1024, 64),
          ("tiles 512, halo 64", 512, 64), ("tiles 256, halo 64", 256, 64)]


def one(args: argparse.Namespace) -> None:
    """Child process: fuse one image with one setup, save the result, print the numbers."""
    torch.manual_seed(0)
    params = load_params(overrides=args.overrides)
    model = create_model(params.model.family, params.config.net).eval()
    engine = TorchEngine(model, params.family, TileSpec(args.size, args.halo))
    gen = torch.Generator().manual_seed(1)
    a, b = (torch.nn.functional.avg_pool2d(torch.rand(1, 1, args.height, args.width,
                                                      generator=gen), 3, 1, 1)[0, 0].numpy()
            for _ in range(2))
    t0 = time.perf_counter()
    fused = torch.from_numpy(engine(a, b))
    seconds = time.perf_counter() - t0
    torch.save(fused, args.out)
    print(json.dumps({"seconds": seconds,
                      "rss_mib": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024}))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--height", type=int, default=1536)
    parser.add_argument("--width", type=int, default=2048)
    parser.add_argument("--set", dest="overrides", action="append", default=[])
    parser.add_argument("--size", type=int)
    parser.add_argument("--halo", type=int)
    parser.add_argument("--out")
    args = parser.parse_args()
    if args.out:
        return one(args)
    rows, whole = [], None
    sets = [f"--set={o}" for o in args.overrides]
    scratch = tempfile.TemporaryDirectory()
    for name, size, halo in SETUPS:
        out = Path(scratch.name) / f"{size}.pt"
        done = subprocess.run([sys.executable, __file__, "--height", str(args.height),
                               "--width", str(args.width), "--size", str(size), "--halo",
                               str(halo), "--out", str(out), *sets],
                              capture_output=True, text=True, check=True)
        numbers = json.loads(done.stdout.strip().splitlines()[-1])
        fused = torch.load(out)
        whole = fused if whole is None else whole
        diff = (fused - whole).abs()
        rows.append((name, numbers["seconds"], numbers["rss_mib"], diff.mean().item() * 255,
                     diff.max().item() * 255))
    scratch.cleanup()
    print(f"{args.width}x{args.height} pair, default model of model.family, CPU threads: "
          f"{torch.get_num_threads()}\n")
    print("| setup | seconds | peak RSS MiB | mean diff (/255) | max diff (/255) |")
    print("|---|---:|---:|---:|---:|")
    for name, seconds, rss, mean, peak in rows:
        print(f"| {name} | {seconds:.2f} | {rss:.0f} | {mean:.2e} | {peak:.2e} |")


if __name__ == "__main__":
    main()
