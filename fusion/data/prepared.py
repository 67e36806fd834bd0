"""Reading a prepared dataset where it lives (a local folder or ``s3://bucket/prefix``), and
publishing a local one to S3, where workers on any node read it.

The layout is the prepare stage's: ``manifest.parquet`` (one row per pair) and
``patches/{train,val}-NNNNN.parquet`` (``fusion.data.shards``).
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from fusion.errors import BadInputError, FusionError
from fusion.files import filesystem, read_if_file, sha256_file

MANIFEST = "manifest.parquet"


@dataclass(frozen=True)
class Source:
    """Where a prepared dataset lives: a pyarrow filesystem and the dataset's root on it."""

    fs: Any
    root: str
    uri: str  # as configured (a folder or s3://bucket/prefix)

    def files(self, split: str) -> list[str]:
        import pyarrow.fs as pafs

        selector = pafs.FileSelector(f"{self.root}/patches", allow_not_found=True)
        names = sorted(i.path for i in self.fs.get_file_info(selector)
                       if i.base_name.startswith(f"{split}-") and i.path.endswith(".parquet"))
        if not names:
            raise FusionError(f"{self.uri}: no {split} patch shards (run `fusion prepare` "
                              "first)")
        return names

    def read(self, name: str) -> bytes | None:
        return read_if_file(self.fs, f"{self.root}/{name}")

    def layout(self, split: str) -> tuple[int, int]:
        """(patch size, rows) of a split, from the shards' metadata alone."""
        import pyarrow.parquet as pq

        rows, size = 0, 0
        for name in self.files(split):
            with self.fs.open_input_file(name) as fh:
                meta = pq.ParquetFile(fh)
                rows += meta.metadata.num_rows
                size = int(meta.schema_arrow.metadata[b"patch_size"])
        return size, rows


def source(data: str, endpoint: str = "") -> Source:
    """The dataset ``train.data`` names: a local folder or ``s3://bucket/prefix``."""
    root, fs = filesystem(data, endpoint, "train.data")
    return Source(fs, root, data)


def split_pairs(data: str, endpoint: str, split: str, raw: list[str]
                ) -> list[tuple[str, Path, Path]]:
    """(id, A file, B file) of one split of a prepared dataset (a folder or S3): the
    manifest names each file relative to the parent of the raw root it was found in
    (``data.raw`` here). A path that would leave its root (``..``, absolute) is refused,
    naming it: a manifest is data, and data does not choose which files are read."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    src = source(data, endpoint)
    where = f"{src.uri.rstrip('/')}/{MANIFEST}"
    manifest = src.read(MANIFEST)
    if manifest is None:
        raise FusionError(f"{where}: no prepared dataset (run `fusion prepare` first)")
    roots = {Path(r).name: Path(r).resolve() for r in raw}
    pairs = []
    for row in pq.read_table(pa.BufferReader(manifest)).to_pylist():
        if row["split"] != split:
            continue
        files = []
        for key in ("a_path", "b_path"):
            rel = Path(row[key])
            root = roots.get(rel.parts[0]) if rel.parts else None
            if root is None:
                raise FusionError(f"{where}: pair {row['id']} is not under any data.raw root")
            path = (root.parent / rel).resolve()
            if rel.is_absolute() or not path.is_relative_to(root):
                raise BadInputError(where, f"pair {row['id']}: {key} {row[key]!r} leaves its "
                                           f"raw root {root}")
            files.append(path)
        pairs.append((row["id"], *files))
    return pairs


def manifest_digest(data: str, endpoint: str = "") -> str:
    """SHA-256 of a prepared dataset's manifest (local folder or S3), "missing" if none."""
    manifest = source(data, endpoint).read(MANIFEST)
    return hashlib.sha256(manifest).hexdigest() if manifest is not None else "missing"


def publish(prepared: str | Path, uri: str, endpoint: str = "") -> int:
    """Copy a prepared dataset's manifest and patch shards to ``uri`` (``s3://bucket/prefix``),
    where Ray Data workers on any node read them; shards there that the dataset no longer
    has are removed. Skipped when the manifest there is byte-identical. Returns files copied."""
    import pyarrow.fs as pafs

    src = Path(prepared)
    manifest = src / MANIFEST
    if not manifest.is_file():
        raise FusionError(f"{src}: no {MANIFEST} (run `fusion prepare` first)")
    root, fs = filesystem(uri, endpoint, "train.data")
    remote = f"{root}/{MANIFEST}"
    there = read_if_file(fs, remote)
    if there is not None and hashlib.sha256(there).hexdigest() == sha256_file(manifest):
        return 0
    local = {p.name for p in (src / "patches").glob("*.parquet")}
    listing = fs.get_file_info(pafs.FileSelector(f"{root}/patches", allow_not_found=True))
    for info in listing:
        if info.base_name not in local:
            fs.delete_file(info.path)
    # shards first, the manifest last: a manifest there means a complete copy
    pafs.copy_files(str(src / "patches"), f"{root}/patches",
                    source_filesystem=pafs.LocalFileSystem(), destination_filesystem=fs)
    pafs.copy_files(str(manifest), remote, source_filesystem=pafs.LocalFileSystem(),
                    destination_filesystem=fs)
    return len(local) + 1


def publish_prepared(data_out: str, train_data: str, endpoint: str = "") -> str | None:
    """``train.data`` on S3 with the prepared dataset here (``data.out``): copy it there
    first (training and search alike), so that workers on nodes without a copy read it (a
    cluster job without a local copy reads what is already there). Returns what happened,
    for the log (None: nothing to publish)."""
    if not train_data.startswith("s3://") or not (Path(data_out) / MANIFEST).is_file():
        return None
    copied = publish(data_out, train_data, endpoint)
    return (f"train.data: {copied} files of {data_out} copied to {train_data}" if copied
            else f"train.data: {train_data} already holds {data_out}")
