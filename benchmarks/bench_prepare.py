"""Time `prepare` on RoadScene subsets of growing size: pairs/s and peak memory.

Each size runs in a fresh process (peak RSS from the OS) so memory growth with the number
of pairs would show. Usage: python benchmarks/bench_prepare.py [--data ../shared/data]
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
from pathlib import Path

CHILD = r"""
import json, resource, sys, time
from fusion.params import DataParams
from fusion.prepare import prepare
raw, out, shard_mb = sys.argv[1], sys.argv[2], float(sys.argv[3])
base = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
t0 = time.perf_counter()
result = prepare(DataParams(raw=[raw], out=out, exclude=[], shard_max_mb=shard_mb))
elapsed = time.perf_counter() - t0
peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
print(json.dumps({"pairs": sum(result.splits.values()),
                  "patches": sum(result.patches.values()), "seconds": elapsed,
                  "import_rss_mb": base / 1024, "peak_rss_mb": peak / 1024}))
"""


def subset(src: Path, dest: Path, n: int) -> Path:
    """A RoadScene-layout folder holding the first ``n`` pairs (symlinks, no copies)."""
    for modality in ("ir", "vi"):
        (dest / modality).mkdir(parents=True)
        for f in sorted((src / modality).iterdir())[:n]:
            (dest / modality / f.name).symlink_to(f.resolve())
    return dest


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--data", default=str(Path(__file__).resolve().parents[2] / "shared/data"))
    parser.add_argument("--shard-mb", type=float, default=64.0)
    args = parser.parse_args()
    src = Path(args.data) / "roadscene"
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        for n in (55, 110, 221):
            raw = subset(src, Path(tmp) / f"rs{n}" / "roadscene", n)
            out = subprocess.run([sys.executable, "-c", CHILD, str(raw), f"{tmp}/out{n}",
                                  str(args.shard_mb)], capture_output=True, text=True, check=True)
            rows.append(json.loads(out.stdout))
    print(f"prepare on RoadScene (shard_max_mb={args.shard_mb:g}), one process per row\n")
    print("| pairs | patches | seconds | pairs/s | patches/s | RSS after import MB | peak RSS MB |")
    print("|---:|---:|---:|---:|---:|---:|---:|")
    for r in rows:
        print(f"| {r['pairs']} | {r['patches']} | {r['seconds']:.2f} | "
              f"{r['pairs'] / r['seconds']:.1f} | {r['patches'] / r['seconds']:.0f} | "
              f"{r['import_rss_mb']:.0f} | {r['peak_rss_mb']:.0f} |")


if __name__ == "__main__":
    main()
