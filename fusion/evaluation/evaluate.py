"""The ``evaluate`` stage: fuse each benchmark set, score models and baselines, report.

For every set in ``evaluate.sets`` each model's fused images are written as PNG, then the
models and two baselines (mean fusion (A+B)/2 and max fusion max(A, B), both on the grey
images the evaluator reads) are scored with the published definitions. Several models
(families) can stand side by side: the pipeline's model is ``model``, the others carry
their own labels. Outputs:

- ``<out>/per_image.parquet``: every image, method and metric;
- ``<out>/summary.json``: {set: {method: {metric: mean}}} (read by register, the flows);
- ``<out>/report.md``: a table per set and its grid image;
- ``<summary>/<set>.json`` (and ``<set>-mean.json``, ``<set>-max.json``): the eight
  published metrics per set, one small file each, so ``dvc metrics show`` prints one
  readable row per set and method;
- ``<grids>/<set>.png``: A | B | fused rows, for ``dvc plots``.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass, replace
from pathlib import Path

import numpy as np
from PIL import Image

from fusion.data.pairs import files_by_stem, read_names
from fusion.errors import FusionError
from fusion.evaluation.gain import means, standings
from fusion.evaluation.scoring import format_table, read_grey, score_arrays
from fusion.files import Output, replacing, write_text
from fusion.inference.fuse import Engine, fuse_files
from fusion.inference.rules import TwoScaleEngine
from fusion.metric_names import EIGHT
from fusion.params import BASELINES, BenchmarkSet, MetricWeight, Params, TwoScaleParams
from fusion.progress import progress

EVALUATED = "evaluated.json"  # which model (weights hash) the reports describe
SUMMARY = "summary.json"  # raw scores: what register, promote and the flows read
PUBLISHED = "published.json"  # the same under the published protocol
REPORT, PER_IMAGE, FUSED = "report.md", "per_image.parquet", "fused"
EVALUATION = Output("fusion evaluate", EVALUATED,
                    frozenset({EVALUATED, SUMMARY, PUBLISHED, REPORT, PER_IMAGE, FUSED}))


@dataclass(frozen=True)
class Candidate:
    """A model to score, under a label (``model`` is the pipeline's own)."""

    label: str
    engine: Engine


def baselines(a: np.ndarray, b: np.ndarray, rule: TwoScaleParams) -> dict[str, np.ndarray]:
    """The training-free fusions every model is measured against, on the grey 0-255 images
    the evaluator reads: mean fusion, max fusion and the two-scale rule (``rule``), before
    rounding (as a model's float output is: scoring rounds, or stretches)."""
    two_scale = TwoScaleEngine(rule)(a / 255.0, b / 255.0)
    return {"mean": (a + b) / 2, "max": np.maximum(a, b),
            "two-scale": two_scale * 255.0}


def stretched(f: np.ndarray) -> np.ndarray:
    """The published protocol: the test scripts behind the published tables min-max
    stretch every fused image (their float output) to 0-255 before saving it as 8-bit and
    scoring it, which raises SD, SF and VIF. Scored beside the raw output, never instead
    of it."""
    low, high = f.min(), f.max()
    return np.round((f - low) / (high - low) * 255.0) if high > low else np.round(f)


def with_sets(params: Params, specs: list[str]) -> Params:
    """``NAME=A_DIR:B_DIR[:NAMES_FILE]`` specs (``fusion evaluate --sets``) in place of
    ``evaluate.sets``; no specs: the params as they are."""
    if not specs:
        return params
    sets = []
    for item in specs:
        name, sep, dirs = item.partition("=")
        parts = dirs.split(":")
        if not sep or not name or len(parts) not in (2, 3):
            raise FusionError(f"--sets {item!r}: expected NAME=A_DIR:B_DIR[:NAMES_FILE]")
        sets.append(BenchmarkSet(name, *parts))
    return replace(params, evaluate=replace(params.evaluate, sets=sets))


def set_pairs(bench: BenchmarkSet) -> list[tuple[str, Path, Path]]:
    """(stem, A, B) of a benchmark set: stems unique in both folders, optionally only
    those named in ``bench.names``; a stem shared by two files is an error."""
    a, b = files_by_stem(bench.a), files_by_stem(bench.b)
    for side in (a, b):
        if side.ambiguous:
            stem = sorted(side.ambiguous)[0]
            raise FusionError(f"evaluate set {bench.name!r}: {side.folder}: "
                              f"{side.reason(stem)}")
    stems = sorted(set(a.unique) & set(b.unique))
    if bench.names:
        wanted = read_names([bench.names])
        stems = [s for s in stems if s in wanted]
    if not stems:
        raise FusionError(f"evaluate set {bench.name!r}: no pairs in {bench.a} and {bench.b}")
    return [(s, a.unique[s], b.unique[s]) for s in stems]


@dataclass
class SetScores:
    """What ``score_sets`` measured: {set: {method: {metric: mean}}}, raw and (when asked)
    under the published protocol, every image's values, and the grid rows of each set."""

    raw: dict[str, dict[str, dict[str, float]]]
    published: dict[str, dict[str, dict[str, float]]]
    records: list[dict]
    grids: dict[str, list]


def score_sets(candidates: list[Candidate], sets: list[BenchmarkSet], params: Params,
               workdir: Path, published: bool = False) -> SetScores:
    """Fuse and score every set, the candidates beside the baselines; ``published`` also
    scores each fused image min-max stretched (``stretched``). Fused images go to
    ``workdir/<label>/<set>/<stem>.png``."""
    scores = SetScores({}, {}, [], {})
    for bench in sets:
        pairs = set_pairs(bench)
        values: dict[str, dict[str, list[dict[str, float]]]] = {"raw": {}, "published": {}}
        scores.grids[bench.name] = []
        for stem, a_path, b_path in progress(pairs, f"evaluate {bench.name}", unit="pair"):
            a, b = read_grey(a_path, params.data.max_pixels), read_grey(b_path,
                                                                         params.data.max_pixels)
            fused, floats = {}, {}  # as saved (8-bit, read back) and before rounding
            for c in candidates:
                path = workdir / c.label / bench.name / f"{stem}.png"
                luma = fuse_files(c.engine, a_path, b_path, path, params.data.max_pixels).luma
                # a model that outputs NaN is scored as the PNG it wrote (NaN as 0), not a crash
                floats[c.label] = np.nan_to_num(luma, nan=0.0) * 255.0
                fused[c.label] = read_grey(path)
            for method, f in baselines(a, b, params.evaluate.two_scale).items():
                floats[method], fused[method] = f, np.round(f)
            for method, f in fused.items():
                for protocol in ("raw", "published") if published else ("raw",):
                    image = stretched(floats[method]) if protocol == "published" else f
                    metrics = score_arrays(image, a, b, params.metrics)
                    values[protocol].setdefault(method, []).append(metrics)
                    scores.records.append({"set": bench.name, "image": stem, "method": method,
                                           "protocol": protocol, **metrics})
            if len(scores.grids[bench.name]) < params.evaluate.grid_rows:
                scores.grids[bench.name].append(
                    (a, b, *(fused[c.label] for c in candidates), fused["two-scale"]))
        for protocol, table in (("raw", scores.raw), ("published", scores.published)):
            if values[protocol]:
                table[bench.name] = {m: {**means(v), "pairs": len(pairs)}
                                     for m, v in values[protocol].items()}
    return scores


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


def evaluate(params: Params, candidates: list[Candidate], digest: str
             ) -> dict[str, dict[str, dict[str, float]]]:
    """Run the stage for ``candidates`` (the first is the pipeline's model, whose weights
    hash is ``digest``); returns {set: {method: {metric: mean}}}."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    ev = params.evaluate
    out = Path(ev.out)
    with replacing(out, EVALUATION) as tmp:
        scores = score_sets(candidates, ev.sets, params, tmp / FUSED, published=True)
        pq.write_table(pa.Table.from_pylist(scores.records), tmp / PER_IMAGE)
        write_text(tmp / SUMMARY, json.dumps(scores.raw, indent=2, sort_keys=True) + "\n")
        write_text(tmp / PUBLISHED, json.dumps(scores.published, indent=2, sort_keys=True)
                   + "\n")
        metrics_dir = Path(ev.summary)
        for name, methods in scores.raw.items():
            rows = {"": methods["model"], "-published": scores.published[name]["model"],
                    **{f"-{b}": methods[b] for b in BASELINES}}
            for suffix, values in rows.items():
                row = {k: round(values[k], 4) for k in EIGHT}
                write_text(metrics_dir / f"{name}{suffix}.json",
                           json.dumps({**row, "pairs": values["pairs"]}, indent=2) + "\n")
            _grid(scores.grids[name], Path(ev.grids) / f"{name}.png")
        labels = [c.label for c in candidates]
        write_text(tmp / REPORT, report(scores, labels, out, Path(ev.grids),
                                        params.promote.weights))
        write_text(tmp / EVALUATED, json.dumps({"model": ev.model, "model_sha256": digest,
                                                "sets": [b.name for b in ev.sets],
                                                "compared": labels[1:]}, indent=2) + "\n")
    return scores.raw


def report(scores: SetScores, labels: list[str], out: Path, grids: Path,
           weights: list[MetricWeight]) -> str:
    lines = ["# Evaluation", "",
             "Published metric definitions (`fusion/metrics.py`). Baselines: mean fusion "
             "(A+B)/2, max fusion max(A, B) and the training-free two-scale rule (the brighter "
             "source's Gaussian base plus both sources' detail, `evaluate.two_scale`; the "
             "default promotion floor), on the same grey images. MI, VIF and SSIM are sums "
             "over the two sources (e.g. SSIM(F, A) + SSIM(F, B)), so their values can exceed "
             "1 (SSIM at most 2); higher is better for every metric but MSE.", "",
             "**Raw**: every image scored as the method wrote it; promotion and its floor use "
             "these. **Published protocol**: each image min-max stretched to 0-255 first, as "
             "the test scripts behind the published tables do, which raises SD, SF "
             "and VIF: only for comparing with published tables.", ""]
    if len(labels) > 1:
        lines += ["Models side by side: " + ", ".join(f"`{label}`" for label in labels), ""]
    for name, methods in scores.raw.items():
        lines += [f"## {name} ({int(methods['model']['pairs'])} pairs)", "", "Raw:", "",
                  format_table(methods), "", "Raw, against the training-free rule and mean fusion: "
                  "the promotion gate's weighted gain over the rule (`promote.weights`) "
                  "and how many of the eight published metrics are above each:", "",
                  standings(methods, weights, EIGHT), "",
                  "Published protocol (min-max stretched):", "",
                  format_table(scores.published[name]), "", "Grid, one row per pair: A | B | "
                  + " | ".join([*labels, "two-scale"]), "",
                  f"![{name}]({Path(os.path.relpath(grids, out)) / name}.png)", ""]
    return "\n".join(lines)
