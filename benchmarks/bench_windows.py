"""What windowed fusion (``fusion.inference.windows``, above ``--exact-pixels``) costs in
quality: the same model on real sets, exact against overlapping windows, scored.

Windows far smaller than the image stand in for the windows of a 49 MP image (a 512-pixel
window of a 768x576 TNO pair sees about 3/5 of it, a 256-pixel one about 1/7; a 512 window
of a 7000^2 image, 1/190). Prints the eight metrics, the promotion gate's weighted gain over the
two-scale rule, and the mean and 99th percentile of |windowed - exact| in grey levels, for
fp32 windows and bf16 ones (what ``--precision auto`` runs in windows where bf16 is native).
Usage: python benchmarks/bench_windows.py [--model DIR] [--data ../shared/data]
"""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
import fusion.models  # noqa: E402,F401  (registers the families)
from fusion.engine.exports import load_model, read_config  # noqa: E402
from fusion.evaluation.evaluate import baselines  # noqa: E402
from fusion.evaluation.gain import means, weighted_gain  # noqa: E402
from fusion.evaluation.scoring import read_grey, score_arrays  # noqa: E402
from fusion.family import get_family  # noqa: E402
from fusion.inference.fuse import TileSpec, TorchEngine  # noqa: E402
from fusion.metric_names import EIGHT  # noqa: E402
from fusion.params import load_params  # noqa: E402

WINDOWS = TileSpec(exact_pixels=0)
MODES = [("exact (fp32)", TileSpec(), "auto"),
         ("windows 512, overlap 32, fp32", WINDOWS, "fp32"),
         ("windows 512, overlap 32, bf16", WINDOWS, "bf16"),
         ("windows 512, overlap 64, fp32", TileSpec(exact_pixels=0, overlap=64), "fp32"),
         ("windows 256, overlap 32, fp32", TileSpec(exact_pixels=0, window=256), "fp32")]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--model", default=str(ROOT / "fusion/models/dae_fuse/pretrained"))
    parser.add_argument("--data", default=str(ROOT.parent / "shared/data"))
    parser.add_argument("--sets", nargs="+", default=["tno:ir:vi", "mri_ct:mri:ct"])
    args = parser.parse_args()
    params = load_params()
    family = get_family(read_config(args.model)["family"])
    model = load_model(args.model)
    engines = {label: TorchEngine(model, family, tiles, precision=precision)
               for label, tiles, precision in MODES}
    print(f"model {args.model} ({family.name}); torch threads "
          f"{os.environ.get('OMP_NUM_THREADS', 'default (all cores)')}\n")
    print(f"| set | mode | {' | '.join(EIGHT)} | gate vs rule | mean diff | p99 diff |")
    print("|---|---|" + "---:|" * (len(EIGHT) + 3))
    for spec in args.sets:
        name, a_dir, b_dir = spec.split(":")
        root = Path(args.data) / name
        stems = sorted(p.stem for p in (root / a_dir).iterdir())
        scores: dict[str, list[dict[str, float]]] = {label: [] for label in [*engines, "rule"]}
        diffs: dict[str, list[np.ndarray]] = {label: [] for label in engines}
        for stem in stems:
            a, b = (read_grey(next((root / d).glob(f"{stem}.*"))) for d in (a_dir, b_dir))
            rule = baselines(a, b, params.evaluate.two_scale)["two-scale"]
            scores["rule"].append(score_arrays(np.round(rule), a, b, params.metrics))
            exact = None
            for label, engine in engines.items():
                fused = engine(a / 255.0, b / 255.0) * 255.0
                exact = fused if exact is None else exact
                scores[label].append(score_arrays(np.round(fused), a, b, params.metrics))
                diffs[label].append(np.abs(fused - exact).ravel())
        rule = means(scores["rule"])
        for label in engines:
            row = means(scores[label])
            gain = 100 * weighted_gain(row, rule, params.promote.weights)
            diff = np.concatenate(diffs[label])
            print(f"| {name} | {label} | " + " | ".join(f"{row[m]:.3f}" for m in EIGHT)
                  + f" | {gain:+.1f}% | {diff.mean():.2f} | {np.percentile(diff, 99):.1f} |")


if __name__ == "__main__":
    main()
