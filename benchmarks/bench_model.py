"""DAE-Fuse cost: parameters, GFLOPs per 640x480 pair, inference seconds and peak memory per
768x576 pair, training patches/s. Usage: python benchmarks/bench_model.py [--set k=v ...]
(model sizes from params.yaml; GPU rows are added when CUDA is available)."""

from __future__ import annotations

import argparse
import resource
import sys
import time
from pathlib import Path

import torch
from torch.utils.flop_counter import FlopCounterMode

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from fusion.model import DAEFuse  # noqa: E402
from fusion.params import load_params  # noqa: E402
from fusion.train import Trainer  # noqa: E402


def timed(fn, repeat: int, device: str) -> float:
    best = float("inf")
    for _ in range(repeat):
        if device == "cuda":
            torch.cuda.synchronize()
        t0 = time.perf_counter()
        fn()
        if device == "cuda":
            torch.cuda.synchronize()
        best = min(best, time.perf_counter() - t0)
    return best


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--set", dest="overrides", action="append", default=[])
    parser.add_argument("--repeat", type=int, default=3)
    args = parser.parse_args()
    params = load_params(overrides=args.overrides)
    model = DAEFuse(params.model).eval()
    n_params = sum(p.numel() for p in model.parameters())
    with torch.no_grad(), FlopCounterMode(display=False) as counter:
        model.fuse(torch.rand(1, 1, 480, 640), torch.rand(1, 1, 480, 640))
    print(f"model: {params.model}\n")
    print(f"| parameters | {n_params / 1e6:.3f} M |\n|---|---|")
    print(f"| GFLOPs per 640x480 pair (fuse) | {counter.get_total_flops() / 1e9:.1f} |")
    devices = ["cpu"] + (["cuda"] if torch.cuda.is_available() else [])
    for device in devices:
        m = DAEFuse(params.model).to(device).eval()
        a, b = torch.rand(1, 1, 576, 768, device=device), torch.rand(1, 1, 576, 768,
                                                                      device=device)
        with torch.inference_mode():
            m.fuse(a, b)
            if device == "cuda":
                torch.cuda.reset_peak_memory_stats()
            seconds = timed(lambda m=m, a=a, b=b: m.fuse(a, b), args.repeat, device)
        if device == "cuda":
            peak = f"{torch.cuda.max_memory_allocated() / 2**20:.0f} MiB GPU"
        else:
            peak = f"{resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024:.0f} MiB RSS"
        print(f"| {device}: seconds per 768x576 pair | {seconds:.3f} |")
        print(f"| {device}: peak memory (process) | {peak} |")
        batch = params.train.batch_size
        size = 128
        for phase in (1, 2):
            trainer = Trainer(params, phase, device)
            pa, pb = torch.rand(batch, 1, size, size), torch.rand(batch, 1, size, size)
            trainer.train_step(pa, pb)
            t = timed(lambda tr=trainer, pa=pa, pb=pb: tr.train_step(pa, pb), args.repeat,
                      device)
            print(f"| {device}: training phase {phase}, patches/s ({size}x{size}, batch "
                  f"{batch}) | {batch / t:.1f} |")


if __name__ == "__main__":
    main()
