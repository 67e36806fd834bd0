"""Every family at its default (CPU) and paper sizes: parameters, GFLOPs per 640x480 pair,
seconds and peak memory per 768x576 pair (TNO 01, through the engines `fusion fuse` runs:
torch, and onnxruntime for the defaults), and the cost of training, per phase: GFLOPs per
128x128 training patch (forward and backward of one step, losses included, divided by the
batch of 8) and training patches/s.

Each measurement runs in its own process (peak RSS is that setup's alone).
Usage: python benchmarks/bench_model.py [--threads 2] [--repeat 3] [--families a,b]
       [--sizes default,paper]
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
TNO = ROOT.parent / "shared" / "data" / "tno"


def best_of(run, repeat: int) -> float:
    """Seconds of the fastest of ``repeat`` calls, after one warm-up call."""
    run()
    times = []
    for _ in range(repeat):
        t0 = time.perf_counter()
        run()
        times.append(time.perf_counter() - t0)
    return min(times)


def measure(family: str, profile: str, threads: int, repeat: int, onnx: bool,
            train: bool) -> dict:
    """Child process: one family at one size."""
    import resource

    import torch
    from torch.utils.flop_counter import FlopCounterMode

    sys.path.insert(0, str(ROOT))
    from fusion.family import profile_update
    from fusion.models import create_model, get_family
    from fusion.params import Params, typed

    torch.set_num_threads(threads)
    fam = get_family(family)
    net = fam.config().net
    if profile != "default":
        raw = profile_update(family, profile)["model"][family]["net"]
        net = typed(type(net), {**net.__dict__, **raw}, "net")
    model = create_model(family, net).eval()
    out = {"family": family, "profile": profile,
           "params_M": sum(p.numel() for p in model.parameters()) / 1e6}
    with torch.no_grad(), FlopCounterMode(display=False) as counter:
        model.fuse(torch.rand(1, 1, 480, 640), torch.rand(1, 1, 480, 640))
    out["gflops_640x480"] = counter.get_total_flops() / 1e9
    from fusion.evaluation.scoring import read_grey
    from fusion.inference.fuse import TorchEngine

    a, b = (read_grey(TNO / side / "01.png") / 255.0 for side in ("ir", "vi"))
    engine = TorchEngine(model, fam)
    out["torch_s_768x576"] = best_of(lambda: engine(a, b), repeat)
    out["peak_rss_MiB"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    if onnx:
        import tempfile

        from fusion.inference.onnx import OnnxEngine, export_onnx

        with tempfile.TemporaryDirectory() as tmp:
            path = export_onnx(model, fam, Path(tmp) / "m.onnx")
            onnx_engine = OnnxEngine.open(path, threads)
            out["onnx_s_768x576"] = best_of(lambda: onnx_engine(a, b), repeat)
    if train:
        from fusion.engine.trainer import Trainer

        params = typed(Params, {"model": {"family": family, family: {"net": net.__dict__}},
                                "train": {"device": "cpu"}}, "")
        for phase in (1, 2):
            trainer = Trainer(params, phase)
            pa, pb = torch.rand(8, 1, 128, 128), torch.rand(8, 1, 128, 128)
            with FlopCounterMode(display=False) as counter:
                trainer.train_step(pa, pb)
            out[f"train{phase}_gflops_patch"] = counter.get_total_flops() / 8 / 1e9
            steps = repeat if profile == "default" else 1  # paper sizes: seconds per step
            t0 = time.perf_counter()
            for _ in range(steps):
                trainer.train_step(pa, pb)
            out[f"train{phase}_patches_s"] = 8 * steps / (time.perf_counter() - t0)
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--repeat", type=int, default=3)
    parser.add_argument("--families", default="dae-fuse,cddfuse,mfdce-fuse")
    parser.add_argument("--sizes", default="default,paper")
    parser.add_argument("--child", default=None, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        family, profile = args.child.split(":")
        print(json.dumps(measure(family, profile, args.threads, args.repeat,
                                 onnx=profile == "default", train=True)))
        return
    keys = ["params_M", "gflops_640x480", "torch_s_768x576", "onnx_s_768x576",
            "peak_rss_MiB", "train1_gflops_patch", "train1_patches_s", "train2_gflops_patch",
            "train2_patches_s"]
    print(f"torch threads: {args.threads}\n")
    print("| family | size | " + " | ".join(keys) + " |")
    print("|---|---|" + "---:|" * len(keys), flush=True)
    for family in args.families.split(","):
        for profile in args.sizes.split(","):  # each row as it finishes: paper rows are slow
            done = subprocess.run([sys.executable, __file__, "--child", f"{family}:{profile}",
                                   "--threads", str(args.threads), "--repeat",
                                   str(args.repeat)], capture_output=True, text=True,
                                  check=True)
            row = json.loads(done.stdout.strip().splitlines()[-1])
            cells = [f"{row[k]:.3g}" if k in row else "-" for k in keys]
            print(f"| {family} | {profile} | " + " | ".join(cells) + " |", flush=True)


if __name__ == "__main__":
    main()
