"""The ``prepare`` stage: raw image pairs -> manifest, rejects report and patch shards.

Outputs are rebuilt in a temporary folder and swapped in only when the stage succeeds, so
a failure never leaves a half-written dataset. Every step is deterministic (sorted inputs,
hash-based split, fixed Parquet options): unchanged inputs give byte-identical outputs.

Low-texture rule: a patch is dropped when *both* of its sources have an intensity standard
deviation (on the [0, 1] scale) below ``data.min_patch_std``; flat sky or road in one
modality is kept when the other modality shows structure there.
"""

from __future__ import annotations

import hashlib
import json
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pyarrow as pa

from fusion.data.images import luma, max_value, read_image, size_mismatch
from fusion.data.pairs import Pair, Reject, discover, read_names
from fusion.data.prepared import MANIFEST
from fusion.data.shards import ShardWriter, write_table
from fusion.errors import BadInputError, FusionError
from fusion.files import Output, replacing, sha256_file, write_text
from fusion.params import DataParams
from fusion.progress import progress

MANIFEST_SCHEMA = pa.schema([
    ("id", pa.string()),
    ("a_path", pa.string()),
    ("b_path", pa.string()),
    ("a_sha256", pa.string()),
    ("b_sha256", pa.string()),
    ("height", pa.int32()),
    ("width", pa.int32()),
    ("a_channels", pa.int8()),
    ("b_channels", pa.int8()),
    ("a_bits", pa.int8()),
    ("b_bits", pa.int8()),
    ("a_modality", pa.string()),
    ("b_modality", pa.string()),
    ("split", pa.string()),
    ("patches", pa.int32()),
])
REJECTS_SCHEMA = pa.schema([("path", pa.string()), ("pair_id", pa.string()),
                            ("reason", pa.string())])
TRAINING_SPLITS = ("train", "val")
PREPARED = Output("fusion prepare", MANIFEST,
                  frozenset({MANIFEST, "rejects.parquet", "patches"}))


@dataclass
class PrepareResult:
    out: Path
    splits: Counter = field(default_factory=Counter)
    patches: Counter = field(default_factory=Counter)
    shards: int = 0
    rejects: list[Reject] = field(default_factory=list)

    def summary(self) -> dict:
        return {"pairs": dict(sorted(self.splits.items())),
                "patches": dict(sorted(self.patches.items())),
                "shards": self.shards, "rejected": len(self.rejects)}

    def line(self) -> str:
        pairs = ", ".join(f"{n} {s}" for s, n in sorted(self.splits.items()))
        return (f"prepare: {sum(self.splits.values())} pairs ({pairs}), "
                f"{sum(self.patches.values())} patches in {self.shards} shards, "
                f"{len(self.rejects)} rejected -> {self.out / 'rejects.parquet'}")


def split_of(pair_id: str, val_ratio: float) -> str:
    """Deterministic train/val assignment from a hash of the pair id."""
    bucket = int.from_bytes(hashlib.sha256(pair_id.encode()).digest()[:8], "big") / 2**64
    return "val" if bucket < val_ratio else "train"


def patch_offsets(length: int, size: int, stride: int) -> list[int]:
    """Grid offsets along one axis; the last patch is aligned to the far edge."""
    if length < size:
        return []
    offsets = list(range(0, length - size + 1, stride))
    if offsets[-1] != length - size:
        offsets.append(length - size)
    return offsets


def cut_patches(pair_id: str, a: np.ndarray, b: np.ndarray, params: DataParams,
                writer: ShardWriter) -> int:
    size, kept = params.patch_size, 0
    a_scale, b_scale = max_value(a.itemsize * 8), max_value(b.itemsize * 8)
    for y in patch_offsets(a.shape[0], size, params.stride):
        for x in patch_offsets(a.shape[1], size, params.stride):
            pa_, pb_ = a[y:y + size, x:x + size], b[y:y + size, x:x + size]
            if max(pa_.std() / a_scale, pb_.std() / b_scale) < params.min_patch_std:
                continue
            writer.add(pair_id, y, x, pa_, pb_)
            kept += 1
    return kept


def _check_params(params: DataParams) -> None:
    if not 0.0 <= params.val_ratio < 1.0:
        raise FusionError(f"data.val_ratio must be in [0, 1), got {params.val_ratio}")
    if params.patch_size < 8 or params.stride < 1:
        raise FusionError("data.patch_size must be >= 8 and data.stride >= 1")
    if params.shard_max_mb <= 0:
        raise FusionError("data.shard_max_mb must be positive")


def _load_pair(pair: Pair, max_pixels: int) -> tuple[np.ndarray, np.ndarray, dict]:
    """Decode and validate one pair; raises BadInputError naming the offending file."""
    a_file, b_file = pair.root / pair.a, pair.root / pair.b
    a_img, b_img = read_image(a_file, max_pixels), read_image(b_file, max_pixels)
    if (a_img.height, a_img.width) != (b_img.height, b_img.width):
        raise size_mismatch(a_file, (a_img.width, a_img.height), b_file,
                            (b_img.width, b_img.height))
    a, b = luma(a_img), luma(b_img)
    for arr, path in ((a, a_file), (b, b_file)):
        if arr.min() == arr.max():
            raise BadInputError(path, f"constant image (every pixel is {arr.flat[0]})")
    info = {"height": a_img.height, "width": a_img.width, "a_channels": a_img.channels,
            "b_channels": b_img.channels, "a_bits": a_img.bits, "b_bits": b_img.bits}
    return a, b, info


def prepare(params: DataParams, raw: list[str] | None = None, out: str | None = None,
            exclude: list[str] | None = None) -> PrepareResult:
    """Run the stage; raises FusionError when no valid pair is left (or on any reject if strict)."""
    _check_params(params)
    raw = list(raw or params.raw)
    out_dir = Path(out or params.out)
    excluded = read_names(list(exclude if exclude is not None else params.exclude))
    if not raw:
        raise FusionError("no raw data folder given (data.raw or --raw)")

    pairs: list[Pair] = []
    result = PrepareResult(out_dir)
    for root in raw:
        found, rejected = discover(root, params.follow_symlinks)
        pairs += found
        result.rejects += rejected
    pairs.sort(key=lambda p: p.id)
    seen: set[str] = set()

    with replacing(out_dir, PREPARED) as tmp:
        (tmp / "patches").mkdir()
        max_bytes = int(params.shard_max_mb * 2**20)
        writers = {s: ShardWriter(tmp / "patches", s, params.patch_size, max_bytes)
                   for s in TRAINING_SPLITS}
        rows: dict[str, list] = {name: [] for name in MANIFEST_SCHEMA.names}
        for pair in progress(pairs, "prepare", unit="pair"):
            if pair.id in seen:
                result.rejects.append(Reject(str(pair.root.name / pair.a),
                                             "duplicate pair id (two raw roots with one name?)",
                                             pair.id))
                continue
            seen.add(pair.id)
            try:
                a, b, info = _load_pair(pair, params.max_pixels)
            except BadInputError as exc:
                rel = exc.path.relative_to(pair.root.parent)
                result.rejects.append(Reject(str(rel), exc.reason, pair.id))
                continue
            stem = pair.id.rsplit("/", 1)[-1].split("@")[0]
            split = ("test" if {pair.id, stem} & excluded
                     else split_of(pair.id, params.val_ratio))
            n = cut_patches(pair.id, a, b, params, writers[split]) if split != "test" else 0
            record = {"id": pair.id, "a_path": str(pair.root.name / pair.a),
                      "b_path": str(pair.root.name / pair.b),
                      "a_sha256": sha256_file(pair.root / pair.a),
                      "b_sha256": sha256_file(pair.root / pair.b),
                      **info, "a_modality": pair.a_modality, "b_modality": pair.b_modality,
                      "split": split, "patches": n}
            for key, value in record.items():
                rows[key].append(value)
            result.splits[split] += 1
            result.patches[split] += n
        for writer in writers.values():
            writer.flush()
            result.shards += len(writer.paths)
        _finish(result, rows, tmp, params)
    return result


def _finish(result: PrepareResult, rows: dict, tmp: Path, params: DataParams) -> None:
    result.rejects.sort(key=lambda r: (r.path, r.reason))
    if not rows["id"]:
        reasons = "; ".join(f"{r.path}: {r.reason}" for r in result.rejects[:5])
        raise FusionError(f"prepare: no valid pair found ({len(result.rejects)} rejected"
                          f"{': ' + reasons if reasons else ''})")
    if params.strict and result.rejects:
        reasons = "; ".join(f"{r.path}: {r.reason}" for r in result.rejects[:5])
        raise FusionError(f"prepare (strict): {len(result.rejects)} input(s) rejected: {reasons}")
    write_table(pa.table(rows, schema=MANIFEST_SCHEMA), tmp / MANIFEST)
    rejects = {"path": [r.path for r in result.rejects],
               "pair_id": [r.pair_id for r in result.rejects],
               "reason": [r.reason for r in result.rejects]}
    write_table(pa.table(rejects, schema=REJECTS_SCHEMA), tmp / "rejects.parquet")


def write_summary(result: PrepareResult, path: str | Path) -> None:
    write_text(path, json.dumps(result.summary(), indent=2, sort_keys=True) + "\n")
