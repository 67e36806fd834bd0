"""Parquet patch shards: bounded-size files of fixed-size patch pairs.

One row per patch: ``pair_id``, offset ``y``/``x``, the raw little-endian bytes of the A and
B patches and their bit depth. The patch size is in the schema metadata. Readers stream a
shard batch by batch, so a training worker never holds the whole dataset.
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from fusion.errors import FusionError

SCHEMA = pa.schema([
    ("pair_id", pa.string()),
    ("y", pa.int32()),
    ("x", pa.int32()),
    ("a", pa.binary()),
    ("b", pa.binary()),
    ("a_bits", pa.uint8()),
    ("b_bits", pa.uint8()),
])
ROW_GROUP_ROWS = 256


def write_table(table: pa.Table, path: Path) -> None:
    """Write Parquet with fixed options so equal tables give byte-identical files."""
    pq.write_table(table, path, compression="zstd", row_group_size=ROW_GROUP_ROWS,
                   write_statistics=False, store_schema=True)


class ShardWriter:
    """Buffers patch rows and writes ``{prefix}-00000.parquet``... of at most ``max_bytes``."""

    def __init__(self, folder: Path, prefix: str, patch_size: int, max_bytes: int) -> None:
        self.folder, self.prefix, self.max_bytes = folder, prefix, max_bytes
        self.schema = SCHEMA.with_metadata({"patch_size": str(patch_size)})
        self.columns: dict[str, list] = {name: [] for name in SCHEMA.names}
        self.buffered = 0
        self.paths: list[Path] = []
        self.rows = 0

    def add(self, pair_id: str, y: int, x: int, a: np.ndarray, b: np.ndarray) -> None:
        a_bytes, b_bytes = a.astype(a.dtype.newbyteorder("<")).tobytes(), b.astype(
            b.dtype.newbyteorder("<")).tobytes()
        for name, value in (("pair_id", pair_id), ("y", y), ("x", x), ("a", a_bytes),
                            ("b", b_bytes), ("a_bits", a.dtype.itemsize * 8),
                            ("b_bits", b.dtype.itemsize * 8)):
            self.columns[name].append(value)
        self.buffered += len(a_bytes) + len(b_bytes) + len(pair_id) + 16
        self.rows += 1
        if self.buffered >= self.max_bytes:
            self.flush()

    def flush(self) -> None:
        if not self.columns["pair_id"]:
            return
        path = self.folder / f"{self.prefix}-{len(self.paths):05d}.parquet"
        write_table(pa.table(self.columns, schema=self.schema), path)
        self.paths.append(path)
        self.columns = {name: [] for name in SCHEMA.names}
        self.buffered = 0


def shard_paths(folder: str | Path, split: str) -> list[Path]:
    """The shards of one split, in a stable order."""
    return sorted(Path(folder).glob(f"{split}-*.parquet"))


def decode_patches(column, bits, size: int) -> np.ndarray:
    """Binary patch column (pyarrow array or sequence of bytes) and bit depths -> float32
    (N, size, size) in [0, 1]."""
    raws = column.to_pylist() if isinstance(column, pa.Array) else list(column)
    depths = bits.to_pylist() if isinstance(bits, pa.Array) else list(bits)
    out = np.empty((len(raws), size, size), dtype=np.float32)
    for i, (raw, depth) in enumerate(zip(raws, depths, strict=True)):
        dtype = np.dtype("<u2") if depth == 16 else np.uint8
        out[i] = np.frombuffer(raw, dtype=dtype).reshape(size, size)
        out[i] /= 65535.0 if depth == 16 else 255.0
    return out


def iter_shard(path: str | Path, batch_rows: int = ROW_GROUP_ROWS
               ) -> Iterator[tuple[np.ndarray, np.ndarray]]:
    """Stream ``(a, b)`` float32 patch batches from one shard without reading it whole."""
    try:
        file = pq.ParquetFile(path)
        size = int(file.schema_arrow.metadata[b"patch_size"])
    except (OSError, pa.ArrowException, KeyError, TypeError) as exc:
        raise FusionError(f"{path}: not a patch shard ({exc})") from exc
    for batch in file.iter_batches(batch_size=batch_rows):
        yield (decode_patches(batch.column("a"), batch.column("a_bits"), size),
               decode_patches(batch.column("b"), batch.column("b_bits"), size))
