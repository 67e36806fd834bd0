"""Scoring fused images against their sources: ``fusion score`` and the evaluate stage.

Images are read the way the published evaluator reads them: RGB -> grey with the
BT.601 weights (OpenCV's BGR2GRAY on float pixels), rounded; 16-bit images are scaled to
the 0-255 range the metric definitions assume.
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from fusion.data.images import DEFAULT_MAX_PIXELS, max_value, read_image
from fusion.data.pairs import files_by_stem, match_stems
from fusion.errors import BadInputError
from fusion.evaluation.gain import means
from fusion.files import write_text
from fusion.metric_names import METRICS
from fusion.params import MetricParams
from fusion.progress import progress

PUBLISHED = MetricParams()  # the definitions of the published evaluator


def read_grey(path: str | Path, max_pixels: int = DEFAULT_MAX_PIXELS) -> np.ndarray:
    """float64 (H, W) grey image on the 0-255 scale, integer valued."""
    image = read_image(path, max_pixels)
    scale = 255.0 / max_value(image.bits)
    pixels = image.pixels.astype(np.float64)
    if image.channels == 3:  # BT.601 weights, as OpenCV's BGR2GRAY
        pixels = pixels @ np.array([0.299, 0.587, 0.114])
    return np.round(pixels * scale)


@dataclass
class ScoreReport:
    """Per-image metric values, their means, and the files that could not be scored."""

    per_image: dict[str, dict[str, float]] = field(default_factory=dict)
    errors: list[str] = field(default_factory=list)

    def means(self) -> dict[str, float]:
        return means(list(self.per_image.values()))

    def to_json(self) -> dict:
        return {"images": self.per_image, "mean": self.means(), "errors": self.errors}


def score_arrays(f: np.ndarray, a: np.ndarray, b: np.ndarray,
                 options: MetricParams = PUBLISHED, device: str = "cpu") -> dict[str, float]:
    import torch

    from fusion.metrics import compute

    tensors = [torch.from_numpy(x).to(device) for x in (f, a, b)]
    return {k: float(v.item()) for k, v in compute(*tensors, options=options).items()}


def score_folders(fused: str | Path, a_dir: str | Path, b_dir: str | Path,
                  options: MetricParams = PUBLISHED, device: str = "cpu",
                  max_pixels: int = DEFAULT_MAX_PIXELS) -> ScoreReport:
    """Score every source pair that has a fused image; report whatever cannot be scored
    (a missing or ambiguous fused image, a lone or ambiguous source, a size mismatch)."""
    fused_stems = files_by_stem(fused)
    pairs, errors = match_stems(a_dir, b_dir)
    report = ScoreReport(errors=errors)
    report.errors += [f"{f}: {fused_stems.reason(stem)}"
                      for stem, files in fused_stems.ambiguous.items() for f in files]
    fused_files = fused_stems.unique
    for stem, a_path, b_path in progress(pairs, "score", unit="pair"):
        if stem in fused_stems.ambiguous:
            continue
        if stem not in fused_files:
            report.errors.append(f"{Path(fused) / stem}.*: fused image missing")
            continue
        try:
            f, a, b = (read_grey(p, max_pixels) for p in (fused_files[stem], a_path, b_path))
        except BadInputError as exc:
            report.errors.append(str(exc))
            continue
        if not f.shape == a.shape == b.shape:
            report.errors.append(f"{fused_files[stem]}: size {f.shape[1]}x{f.shape[0]} differs "
                                 f"from its sources ({a.shape[1]}x{a.shape[0]})")
            continue
        report.per_image[fused_files[stem].name] = score_arrays(f, a, b, options, device)
    for stem in sorted(set(fused_files) - {stem for stem, _, _ in pairs}):
        report.errors.append(f"{fused_files[stem]}: no source images with this name")
    return report


def format_table(rows: dict[str, dict[str, float]], names: tuple[str, ...] = METRICS) -> str:
    """Markdown table, one row per entry (e.g. per set or per method)."""
    lines = ["| | " + " | ".join(names) + " |", "|---" * (len(names) + 1) + "|"]
    for label, values in rows.items():
        cells = [f"{values[n]:.3f}" if not math.isnan(values.get(n, math.nan)) else "-"
                 for n in names]
        lines.append(f"| {label} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def write_json(report: ScoreReport, path: str | Path) -> None:
    write_text(path, json.dumps(report.to_json(), indent=2, sort_keys=True) + "\n")
