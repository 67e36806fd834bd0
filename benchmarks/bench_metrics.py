"""Seconds per 768x576 pair for each metric: ours (torch) vs a NumPy/SciPy reference.

The reference is tests/reference_metrics.py (same definitions, scipy convolve2d, loops like
the published evaluator). Usage: python benchmarks/bench_metrics.py [--data DIR] [--pairs N]
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from fusion import metrics  # noqa: E402
from fusion.evaluation.scoring import read_grey  # noqa: E402
from fusion.metric_names import EIGHT  # noqa: E402
from tests import reference_metrics as ref  # noqa: E402

REFERENCE = {
    "EN": lambda f, a, b: ref.en(f), "SD": lambda f, a, b: np.std(f),
    "SF": lambda f, a, b: ref.sf(f), "MI": ref.mi, "SCD": ref.scd, "VIF": ref.vif,
    "Qabf": ref.qabf, "SSIM": ref.ssim,
}


def best_of(fn, repeat: int) -> float:
    times = []
    for _ in range(repeat):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return min(times)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--data", default=str(Path(__file__).resolve().parents[2] / "shared/data"))
    parser.add_argument("--pairs", type=int, default=3)
    parser.add_argument("--repeat", type=int, default=3)
    args = parser.parse_args()
    tno = Path(args.data) / "tno"
    stems = sorted(p.stem for p in (tno / "ir").iterdir())
    triples = []
    for stem in stems:
        a, b = read_grey(tno / "ir" / f"{stem}.png"), read_grey(tno / "vi" / f"{stem}.png")
        if a.shape == (576, 768):
            triples.append((np.round((a + b) / 2), a, b))
        if len(triples) == args.pairs:
            break
    devices = ["cpu"] + (["cuda"] if torch.cuda.is_available() else [])
    print(f"{len(triples)} TNO pairs of 768x576, fused = mean fusion; torch threads "
          f"{torch.get_num_threads()}; best of {args.repeat}, seconds per pair\n")
    header = "| metric | reference (NumPy/SciPy) | " + " | ".join(
        f"ours {d}" for d in devices) + " | speed-up (cpu) |"
    print(header + "\n" + "|---" * (3 + len(devices)) + "|")
    totals = {"reference": 0.0, **{d: 0.0 for d in devices}}
    for name in EIGHT:
        t_ref = best_of(lambda n=name: [REFERENCE[n](*t) for t in triples], args.repeat)
        row = [t_ref / len(triples)]
        for device in devices:
            ts = [[torch.from_numpy(x).to(device) for x in t] for t in triples]

            def run(n=name, ts=ts, device=device):
                for t in ts:
                    metrics.compute(*t, names=(n,))
                if device == "cuda":
                    torch.cuda.synchronize()
            run()
            row.append(best_of(run, args.repeat) / len(triples))
        totals["reference"] += row[0]
        for d, v in zip(devices, row[1:], strict=True):
            totals[d] += v
        print(f"| {name} | {row[0]:.4f} | " + " | ".join(f"{v:.4f}" for v in row[1:])
              + f" | {row[0] / row[1]:.0f}x |")
    print(f"| **all eight** | {totals['reference']:.3f} | "
          + " | ".join(f"{totals[d]:.4f}" for d in devices)
          + f" | {totals['reference'] / totals['cpu']:.0f}x |")
    one = [torch.from_numpy(x) for x in triples[0]]
    t_all = best_of(lambda: metrics.compute(*one, names=EIGHT), args.repeat)
    print(f"\nall eight in one `metrics.compute` call, cpu: {t_all:.4f} s per pair")


if __name__ == "__main__":
    main()
