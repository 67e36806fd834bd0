"""The ``evaluate`` stage: fuse each benchmark set, score model and baselines, write reports.

For every set in ``evaluate.sets`` the model's fused images are written as PNG, then the
model and two baselines (mean fusion (A+B)/2 and max fusion max(A, B), both on the grey
images the evaluator reads) are scored with the published definitions. Outputs:
per-image metrics (Parquet), per-set means (JSON for ``dvc metrics``), a markdown report
and one PNG grid per set (A | B | fused).
"""

from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
from PIL import Image

from fusion import metrics
from fusion.checkpoint import load_model
from fusion.errors import FusionError
from fusion.inference import TileSpec, fuse_files
from fusion.model import DAEFuse
from fusion.params import BenchmarkSet, Params
from fusion.prepare import read_exclusions
from fusion.scoring import format_table, images_by_stem, read_grey, score_arrays

METHODS = ("model", "mean", "max")
EVALUATED = "evaluated.json"  # which model (weights hash) the reports describe


def _pairs(bench: BenchmarkSet) -> list[tuple[str, Path, Path]]:
    a_files, b_files = images_by_stem(bench.a), images_by_stem(bench.b)
    stems = sorted(set(a_files) & set(b_files))
    if bench.names:
        wanted = read_exclusions([bench.names])
        stems = [s for s in stems if s in wanted]
    if not stems:
        raise FusionError(f"evaluate set {bench.name!r}: no pairs in {bench.a} and {bench.b}")
    return [(s, a_files[s], b_files[s]) for s in stems]


def _grid(rows: list[tuple[np.ndarray, ...]], path: Path, height: int = 160) -> None:
    """Rows of grey images side by side, each scaled to ``height`` pixels."""
    tiles = []
    for row in rows:
        scaled = [Image.fromarray(np.clip(x, 0, 255).astype(np.uint8)).resize(
            (max(1, round(x.shape[1] * height / x.shape[0])), height)) for x in row]
        strip = Image.new("L", (sum(s.width for s in scaled) + 4 * (len(scaled) - 1), height))
        x = 0
        for s in scaled:
            strip.paste(s, (x, 0))
            x += s.width + 4
        tiles.append(strip)
    grid = Image.new("L", (max(t.width for t in tiles), (height + 4) * len(tiles) - 4), 255)
    for i, t in enumerate(tiles):
        grid.paste(t, (0, i * (height + 4)))
    path.parent.mkdir(parents=True, exist_ok=True)
    grid.save(path)


def score_model(model: DAEFuse, sets: list[BenchmarkSet], params: Params,
                workdir: Path) -> dict[str, dict[str, float]]:
    """{set: {metric: mean}} of one model, its fused images written under ``workdir``
    (used by ``fusion promote`` to compare two models on the same sets)."""
    summary = {}
    for bench in sets:
        values = []
        for stem, a_path, b_path in _pairs(bench):
            fused_path = workdir / bench.name / f"{stem}.png"
            fuse_files(model, a_path, b_path, fused_path, TileSpec(params.evaluate.tile))
            values.append(score_arrays(read_grey(fused_path), read_grey(a_path),
                                       read_grey(b_path), params.metrics))
        summary[bench.name] = {k: float(np.mean([v[k] for v in values])) for k in metrics.ALL}
    return summary


def model_digest(folder: str | Path) -> str:
    """sha256 of an exported model's weights: ties reports and registry entries to it."""
    path = Path(folder) / "model.safetensors"
    if not path.exists():
        raise FusionError(f"{folder}: no exported model (model.safetensors missing)")
    return hashlib.sha256(path.read_bytes()).hexdigest()


def evaluate(params: Params) -> dict[str, dict[str, dict[str, float]]]:
    """Run the stage; returns {set: {method: {metric: mean}}}."""
    ev = params.evaluate
    out = Path(ev.out)
    model = load_model(ev.model)
    digest = model_digest(ev.model)
    records: list[dict] = []
    summary: dict[str, dict[str, dict[str, float]]] = {}
    for bench in ev.sets:
        pairs = _pairs(bench)
        per_method: dict[str, list[dict[str, float]]] = {m: [] for m in METHODS}
        grid_rows = []
        for stem, a_path, b_path in pairs:
            fused_path = out / "fused" / bench.name / f"{stem}.png"
            fuse_files(model, a_path, b_path, fused_path, TileSpec(ev.tile))
            a, b = read_grey(a_path), read_grey(b_path)
            candidates = {"model": read_grey(fused_path), "mean": np.round((a + b) / 2),
                          "max": np.maximum(a, b)}
            for method, f in candidates.items():
                values = score_arrays(f, a, b, params.metrics)
                per_method[method].append(values)
                records.append({"set": bench.name, "image": stem, "method": method, **values})
            if len(grid_rows) < ev.grid_rows:
                grid_rows.append((a, b, candidates["model"]))
        summary[bench.name] = {m: {k: float(np.mean([v[k] for v in vals]))
                                   for k in metrics.ALL} for m, vals in per_method.items()}
        summary[bench.name]["model"]["pairs"] = len(pairs)
        _grid(grid_rows, Path(ev.grids) / f"{bench.name}.png")
    _write(records, summary, out, Path(ev.summary), Path(ev.grids))
    (out / EVALUATED).write_text(json.dumps({"model": ev.model, "model_sha256": digest,
                                             "sets": [b.name for b in ev.sets]}, indent=2))
    return summary


def _write(records: list[dict], summary: dict, out: Path, summary_path: Path,
           grids: Path) -> None:
    out.mkdir(parents=True, exist_ok=True)
    pq.write_table(pa.Table.from_pylist(records), out / "per_image.parquet")
    summary_path.parent.mkdir(parents=True, exist_ok=True)
    summary_path.write_text(json.dumps(summary, indent=2, sort_keys=True) + "\n")
    lines = ["# Evaluation", "",
             "Published metric definitions (see `fusion/metrics.py`); fused images are scored "
             "as the model wrote them, without min-max stretching. Baselines: mean fusion "
             "(A+B)/2 and max fusion max(A, B) on the same grey images.", ""]
    for name, methods in summary.items():
        lines += [f"## {name} ({int(methods['model']['pairs'])} pairs)", "",
                  format_table(methods), "",
                  f"![{name}]({Path(os.path.relpath(grids, out)) / name}.png)", ""]
    (out / "report.md").write_text("\n".join(lines))
