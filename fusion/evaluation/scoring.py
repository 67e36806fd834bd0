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

import kornia.color
import numpy as np
import torch

from fusion import metrics
from fusion.errors import BadInputError
from fusion.imaging import SUPPORTED_SUFFIXES, max_value, read_image, to_float


def read_grey(path: str | Path) -> np.ndarray:
    """float64 (H, W) grey image on the 0-255 scale, integer valued."""
    image = read_image(path)
    scale = 255.0 / max_value(image.bits)
    if image.channels == 1:
        return np.round(image.pixels.astype(np.float64) * scale)
    grey = kornia.color.rgb_to_grayscale(to_float(image.pixels))[0].double()
    return np.round(grey.numpy() * max_value(image.bits) * scale)


def images_by_stem(folder: str | Path) -> dict[str, Path]:
    folder = Path(folder)
    if not folder.is_dir():
        raise BadInputError(folder, "folder not found")
    return {p.stem: p for p in sorted(folder.iterdir())
            if p.suffix.lower() in SUPPORTED_SUFFIXES and not p.name.startswith(".")}


def match_by_stem(a_dir: str | Path, b_dir: str | Path
                  ) -> tuple[list[tuple[str, Path, Path]], list[str]]:
    """(stem, A file, B file) for names in both folders, and an error line per lone file."""
    a_files, b_files = images_by_stem(a_dir), images_by_stem(b_dir)
    pairs, errors = [], []
    for stem in sorted(set(a_files) | set(b_files)):
        if stem in a_files and stem in b_files:
            pairs.append((stem, a_files[stem], b_files[stem]))
        else:
            other = b_dir if stem in a_files else a_dir
            errors.append(f"{a_files.get(stem) or b_files[stem]}: no partner in {other}")
    return pairs, errors


@dataclass
class ScoreReport:
    """Per-image metric values, their means, and the files that could not be scored."""

    per_image: dict[str, dict[str, float]] = field(default_factory=dict)
    errors: list[str] = field(default_factory=list)

    def means(self) -> dict[str, float]:
        if not self.per_image:
            return {}
        names = next(iter(self.per_image.values())).keys()
        return {n: float(np.mean([v[n] for v in self.per_image.values()])) for n in names}

    def to_json(self) -> dict:
        return {"images": self.per_image, "mean": self.means(), "errors": self.errors}


def score_arrays(f: np.ndarray, a: np.ndarray, b: np.ndarray,
                 options: metrics.MetricOptions = metrics.PUBLISHED,
                 device: str = "cpu") -> dict[str, float]:
    tensors = [torch.from_numpy(x).to(device) for x in (f, a, b)]
    return {k: float(v.item()) for k, v in metrics.compute(*tensors, options=options).items()}


def score_folders(fused: str | Path, a_dir: str | Path, b_dir: str | Path,
                  options: metrics.MetricOptions = metrics.PUBLISHED,
                  device: str = "cpu") -> ScoreReport:
    """Score every source pair that has a fused image; report whatever cannot be scored."""
    fused_files = images_by_stem(fused)
    pairs, errors = match_by_stem(a_dir, b_dir)
    report = ScoreReport(errors=errors)
    for stem, a_path, b_path in pairs:
        if stem not in fused_files:
            report.errors.append(f"{Path(fused) / stem}.*: fused image missing")
            continue
        try:
            f, a, b = (read_grey(p) for p in (fused_files[stem], a_path, b_path))
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


def format_table(rows: dict[str, dict[str, float]], names: tuple[str, ...] = metrics.ALL) -> str:
    """Markdown table, one row per entry (e.g. per set or per method)."""
    lines = ["| | " + " | ".join(names) + " |", "|---" * (len(names) + 1) + "|"]
    for label, values in rows.items():
        cells = [f"{values[n]:.3f}" if not math.isnan(values.get(n, math.nan)) else "-"
                 for n in names]
        lines.append(f"| {label} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def write_json(report: ScoreReport, path: str | Path) -> None:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(report.to_json(), indent=2, sort_keys=True) + "\n")
