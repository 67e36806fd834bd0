"""What a user waits for at the command line: every bad-input path of `fusion fuse`, and a
whole `fusion fuse` of one 768x576 pair (torch and onnxruntime), each a fresh process, from
the command to its exit. Budgets: errors 2 s, a fuse 5 s (2-core CPU).

Usage: python benchmarks/bench_startup.py --model MODEL_DIR [--repeat 3]
(MODEL_DIR: an exported model, e.g. models/phase2; the pair is TNO 01 of ../shared/data)
"""

from __future__ import annotations

import argparse
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
from PIL import Image

ROOT = Path(__file__).resolve().parents[1]
TNO = ROOT.parent / "shared" / "data" / "tno"


def timed(args: list[str], repeat: int) -> tuple[float, int]:
    times, code = [], 0
    for _ in range(repeat):
        t0 = time.perf_counter()
        done = subprocess.run([sys.executable, "-m", "fusion.cli", *args], cwd=ROOT,
                              capture_output=True, text=True)
        times.append(time.perf_counter() - t0)
        code = done.returncode
    return statistics.median(times), code


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", required=True)
    parser.add_argument("--repeat", type=int, default=3)
    args = parser.parse_args()
    tmp = Path(tempfile.mkdtemp())
    a, b = TNO / "ir" / "01.png", TNO / "vi" / "01.png"
    Image.fromarray(np.zeros((575, 768), np.uint8)).save(tmp / "small.png")
    Image.new("1", (13000, 13000)).save(tmp / "bomb.png")
    Image.fromarray(np.zeros((576, 768), np.uint16)).save(tmp / "deep.png")
    (tmp / "broken.png").write_bytes(b"\x89PNG not really")
    onnx = tmp / "model.onnx"
    subprocess.run([sys.executable, "-m", "fusion.cli", "export", "--model", args.model,
                    "--onnx", str(onnx)], cwd=ROOT, check=True, capture_output=True)
    fuse = ["fuse", "--model", args.model, "--a", str(a), "--b", str(b)]
    cases = [
        ("error: size mismatch", fuse[:4] + ["--b", str(tmp / "small.png"), "-o",
                                              str(tmp / "x.png")]),
        ("error: file not found", fuse[:4] + ["--b", str(tmp / "none.png"), "-o",
                                               str(tmp / "x.png")]),
        ("error: undecodable image", fuse[:4] + ["--b", str(tmp / "broken.png"), "-o",
                                                  str(tmp / "x.png")]),
        ("error: over the pixel limit", fuse[:2] + ["--a", str(tmp / "bomb.png"), "--b",
                                                    str(tmp / "bomb.png"), "-o",
                                                    str(tmp / "x.png")]),
        ("error: 16-bit into .jpg", fuse[:2] + ["--a", str(tmp / "deep.png"), "--b", str(b),
                                                "-o", str(tmp / "x.jpg")]),
        ("error: bad --set", fuse + ["-o", str(tmp / "x.png"), "--set", "nosection.x=1"]),
        ("error: unknown model family", ["fuse", "--model", str(tmp), "--a", str(a), "--b",
                                         str(b), "-o", str(tmp / "x.png")]),
        ("fuse 768x576, torch", fuse + ["-o", str(tmp / "t.png")]),
        ("fuse 768x576, onnxruntime", ["fuse", "--engine", "onnxruntime", "--model",
                                       str(onnx), "--a", str(a), "--b", str(b), "-o",
                                       str(tmp / "o.png")]),
    ]
    print(f"{os.cpu_count()} cores, load average {os.getloadavg()[0]:.2f}; median of "
          f"{args.repeat} runs\n\n| command | exit | seconds |\n|---|---:|---:|")
    for name, command in cases:
        seconds, code = timed(command, args.repeat)
        print(f"| {name} | {code} | {seconds:.2f} |", flush=True)


if __name__ == "__main__":
    main()
