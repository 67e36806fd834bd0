"""``fusion fuse --ray``: two folders or S3 prefixes of pairs fused on the Ray cluster.

Pairs are matched by stem as folder mode matches them (``fusion.data.pairs``); a stem that
two files share on one side is refused, naming it, before anything is fused. Ray Data hands
the pairs to ``batch.workers`` actors, each holding one onnxruntime session of the model
(its ONNX export, sent once through the object store: nodes need no registry access), on
CPUs or GPUs. Each actor reads its pairs (a folder or S3), fuses them as ``fusion fuse``
does (colour, 16 bit) and writes ``OUT/<stem>.png`` atomically (a temporary file renamed,
or a single S3 put): an output is whole or absent.

Resumable: the driver records every fused pair in ``OUT/manifest/part-*.parquet`` (pair,
source paths and SHA-256, model and version, output and its SHA-256, the run), a part at a
time. A rerun skips the pairs recorded there whose output exists, so a kill at any point
costs at most the pairs not yet recorded, which are fused again. An output folder whose
manifest names another model is refused: results of two models are never mixed.
"""

from __future__ import annotations

import hashlib
import os
import sys
import time
import uuid
from dataclasses import dataclass, field
from pathlib import Path, PurePosixPath
from typing import Any

from fusion.data.pairs import pair_stems, stems_at
from fusion.errors import BadInputError, FusionError, TransientError
from fusion.files import filesystem, read_if_file, write_error
from fusion.params import Params

MANIFEST = "manifest"  # OUT/manifest/part-<run>-<n>.parquet
COLUMNS = ("pair", "a", "b", "a_sha256", "b_sha256", "model", "version", "output",
           "output_sha256", "run", "seconds")  # seconds: the worker's, read to write
PART_ROWS, PART_SECONDS = 64, 10.0  # a manifest part at least this often


@dataclass(frozen=True)
class BatchModel:
    """What every worker fuses with: an ONNX export and the model it comes from."""

    name: str
    version: str
    onnx: bytes


@dataclass
class BatchReport:
    fused: int = 0
    skipped: int = 0  # recorded by an earlier run, output present
    errors: list[str] = field(default_factory=list)


def batch_model(params: Params, ref: str) -> BatchModel:
    """``--model`` as an ONNX export: an .onnx file, a registry version's ONNX artifact, or
    an export folder exported here."""
    from fusion.engine.exports import read_config, weights_digest
    from fusion.mlops.model_refs import alias_uri, fetch, is_uri, load_ref
    from fusion.mlops.pyfunc import ONNX, artifact

    path = Path(ref)
    if path.suffix == ".onnx":
        if not path.is_file():
            raise BadInputError(path, "not found")
        data = path.read_bytes()
        return BatchModel(path.stem, hashlib.sha256(data).hexdigest()[:12], data)
    if is_uri(alias_uri(params, ref)):
        root, source = fetch(params, ref)
        name, _, version = source.removeprefix("models:/").rpartition("/")
        return BatchModel(name, version, artifact(root, ONNX).read_bytes())
    import tempfile

    from fusion.inference.onnx import export_onnx

    family = read_config(ref)["family"]
    _, model = load_ref(params, ref)
    with tempfile.TemporaryDirectory() as tmp:
        onnx = export_onnx(model, model_family(family), Path(tmp) / "model.onnx").read_bytes()
    return BatchModel(family, weights_digest(ref)[:12], onnx)


def model_family(name: str) -> Any:
    from fusion.family import get_family

    return get_family(name)


class FuseWorker:
    """A Ray Data actor: one onnxruntime session, then pairs in, rows out (see the module)."""

    def __init__(self, model: BatchModel, out: str, endpoint: str, max_pixels: int,
                 threads: int, gpu: bool, run: str) -> None:
        import tempfile

        from fusion.inference.onnx import OnnxEngine

        self.model, self.run, self.max_pixels = model, run, max_pixels
        self.out_root, self.fs = filesystem(out, endpoint, "-o")
        self.local = not out.startswith("s3://")
        self.in_fs = {}  # input root -> filesystem
        self.endpoint = endpoint
        folder = tempfile.mkdtemp(prefix="fusion-batch-")
        path = Path(folder) / "model.onnx"
        path.write_bytes(model.onnx)
        self.engine = OnnxEngine.open(path, threads=threads, gpu=gpu)

    def _read(self, uri: str) -> bytes:
        root = uri.rsplit("/", 1)[0]
        if root not in self.in_fs:
            self.in_fs[root] = filesystem(root, self.endpoint, "input folder")[1]
        data = read_if_file(self.in_fs[root], uri.removeprefix("s3://"))
        if data is None:
            raise BadInputError(uri, "not found")
        return data

    def _write(self, name: str, data: bytes) -> str:
        path = f"{self.out_root}/{name}"
        try:
            if self.local:  # a temporary file renamed: whole or absent
                tmp = f"{self.out_root}/.{name}.tmp-{os.getpid()}"
                with open(tmp, "wb") as fh:
                    fh.write(data)
                os.replace(tmp, path)
            else:  # one S3 object appears only once its upload completes
                with self.fs.open_output_stream(path) as fh:
                    fh.write(data)
        except OSError as exc:  # a full disk stops the run (exit 75), at the driver
            raise write_error(path, exc) from exc
        return path

    def __call__(self, batch: dict[str, Any]) -> dict[str, list]:
        from fusion.data.images import FORMATS, Upload, encode_image, probe_image, read_image
        from fusion.inference.fuse import fuse_images, plan

        rows: dict[str, list] = {k: [] for k in (*COLUMNS, "error")}
        for pair, a, b in zip(batch["pair"], batch["a"], batch["b"], strict=True):
            started = time.perf_counter()
            row = {"pair": str(pair), "a": str(a), "b": str(b), "model": self.model.name,
                   "version": self.model.version, "run": self.run, "a_sha256": "",
                   "b_sha256": "", "output": "", "output_sha256": "", "error": ""}
            try:
                sources = [Upload(str(p), self._read(str(p)), tuple(FORMATS)) for p in (a, b)]
                plan(*(probe_image(s, self.max_pixels) for s in sources))
                fused = fuse_images(self.engine, *(read_image(s, self.max_pixels)
                                                   for s in sources))
                data = encode_image(fused.pixels, ".png")
                name = f"{pair}.png"
                self._write(name, data)
                row.update(a_sha256=hashlib.sha256(sources[0].data).hexdigest(),
                           b_sha256=hashlib.sha256(sources[1].data).hexdigest(),
                           output=name, output_sha256=hashlib.sha256(data).hexdigest())
            except BadInputError as exc:
                row["error"] = str(exc)
            row["seconds"] = time.perf_counter() - started
            for key, value in row.items():
                rows[key].append(value)
        return rows


def _recorded(fs: Any, out_root: str) -> list[dict[str, Any]]:
    """The manifest rows earlier runs wrote under ``OUT/manifest/``."""
    import pyarrow as pa
    import pyarrow.fs as pafs
    import pyarrow.parquet as pq

    parts = [i.path for i in fs.get_file_info(pafs.FileSelector(f"{out_root}/{MANIFEST}",
                                                                allow_not_found=True))
             if i.base_name.startswith("part-") and i.base_name.endswith(".parquet")]
    rows = []
    for part in sorted(parts):
        rows += pq.read_table(pa.BufferReader(read_if_file(fs, part))).to_pylist()
    return rows


def _write_part(fs: Any, out_root: str, rows: list[dict[str, Any]], run: str,
                number: int) -> None:
    """One manifest part, whole or absent (a temporary name renamed, or one S3 put)."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    table = pa.table({k: [r[k] for r in rows] for k in COLUMNS})
    buffer = pa.BufferOutputStream()
    pq.write_table(table, buffer)
    name = f"{out_root}/{MANIFEST}/part-{run}-{number:05d}.parquet"
    fs.create_dir(f"{out_root}/{MANIFEST}", recursive=True)
    tmp = f"{out_root}/{MANIFEST}/.part-{run}-{number:05d}.tmp"
    with fs.open_output_stream(tmp if out_root.startswith("/") else name) as fh:
        fh.write(buffer.getvalue().to_pybytes())
    if out_root.startswith("/"):
        fs.move(tmp, name)


def _endpoint(params: Params) -> str:
    """The S3 endpoint this process resolves (``batch.storage_endpoint``, else
    ``$AWS_ENDPOINT_URL``), handed to the workers: a node started without that variable
    would look for the bucket on AWS."""
    from fusion.s3 import s3_endpoint

    return s3_endpoint(params.batch.storage_endpoint)


def pairs_to_fuse(params: Params, a: str, b: str, out: str
                  ) -> tuple[list[dict[str, str]], BatchReport, Any, str]:
    """The pairs still to fuse, what is already done or cannot be paired, and the output's
    filesystem and root. A stem two files share on one side is refused here."""
    endpoint = _endpoint(params)
    (sa, _), (sb, _) = stems_at(a, endpoint), stems_at(b, endpoint)
    for side, uri in ((sa, a), (sb, b)):
        if side.ambiguous:
            raise BadInputError(uri, side.reason(sorted(side.ambiguous)[0]))
    pairs, problems = pair_stems(sa, sb)
    report = BatchReport(errors=[f"{path}: {reason}" for _, path, reason in problems])
    out_root, fs = filesystem(out, endpoint, "-o")
    fs.create_dir(out_root, recursive=True)
    done = set()
    for row in _recorded(fs, out_root):
        done.add(row["pair"])
    todo = []
    for stem, pa_, pb_ in pairs:
        if stem in done and read_if_file(fs, f"{out_root}/{stem}.png") is not None:
            report.skipped += 1
            continue
        todo.append({"pair": stem, "a": _uri(a, pa_), "b": _uri(b, pb_)})
    return todo, report, fs, out_root


def _uri(folder: str, path: PurePosixPath) -> str:
    """A listed file as workers address it: ``s3://bucket/key`` or a local path."""
    return f"s3://{path}" if folder.startswith("s3://") else str(path)


def _check_model(fs: Any, out_root: str, model: BatchModel) -> None:
    others = {(r["model"], r["version"]) for r in _recorded(fs, out_root)}
    others.discard((model.name, model.version))
    if others:
        name, version = sorted(others)[0]
        raise BadInputError(f"{out_root}/{MANIFEST}", f"holds pairs fused by {name} "
                                                      f"{version}, not {model.name} "
                                                      f"{model.version}: fuse into another "
                                                      "folder")


def _batches(dataset: Any) -> Any:
    """The workers' rows as they come; a worker's failure (a full disk, a lost node beyond
    the retries) is one line naming its cause (exit 75), not Ray's traceback."""
    try:
        yield from dataset.iter_batches(batch_size=None, batch_format="pandas")
    except Exception as exc:
        cause = _root(exc)
        if isinstance(cause, FusionError):
            raise cause from exc
        lines = str(cause).strip().splitlines() or [type(cause).__name__]
        raise TransientError(f"fuse (ray): {type(cause).__name__}: {lines[-1][:300]}") from exc


def _root(exc: BaseException) -> BaseException:
    """The exception under Ray's wrappers (RayTaskError, Ray Data's UserCodeException)."""
    seen = set()
    while id(exc) not in seen:
        seen.add(id(exc))
        inner = getattr(exc, "cause", None) or exc.__cause__
        if inner is None:
            return exc
        exc = inner
    return exc


def fuse_on_cluster(params: Params, ref: str, a: str, b: str, out: str,
                    address: str = "") -> BatchReport:
    """Fuse every pair not yet recorded in ``out``'s manifest on the Ray cluster."""
    from fusion.engine.cluster import connect
    from fusion.progress import progress

    todo, report, fs, out_root = pairs_to_fuse(params, a, b, out)
    model = batch_model(params, ref)
    _check_model(fs, out_root, model)
    if not todo:
        return report
    connect(address or params.ray.address)
    import ray
    import ray.data

    s, run = params.batch, uuid.uuid4().hex[:12]
    ctx = ray.data.DataContext.get_current()
    ctx.enable_progress_bars = False  # ours, below, counts pairs
    rows = ray.data.from_items(todo, override_num_blocks=max(1, len(todo) // s.pairs_per_batch))
    fused = rows.map_batches(
        FuseWorker, batch_size=s.pairs_per_batch, concurrency=s.workers,
        num_cpus=s.cpus_per_worker, num_gpus=1 if s.use_gpu else 0,
        fn_constructor_kwargs={"model": model, "out": out, "run": run,
                               "endpoint": _endpoint(params),
                               "max_pixels": params.data.max_pixels,
                               "threads": max(1, int(s.cpus_per_worker)), "gpu": s.use_gpu})
    # Ray Data restarts an actor lost with its node and retries its pairs (its defaults:
    # no limit); a pair fused twice that way was never recorded, so the manifest holds it once
    pending, written, last = [], 0, time.time()
    bar = iter(progress(range(len(todo)), "fuse (ray)", total=len(todo), unit="pair"))
    for batch in _batches(fused):
        for row in batch.to_dict("records"):
            next(bar, None)
            if row["error"]:
                report.errors.append(row["error"])
            else:
                pending.append(row)
        if len(pending) >= PART_ROWS or (pending and time.time() - last > PART_SECONDS):
            _write_part(fs, out_root, pending, run, written)
            report.fused += len(pending)
            pending, written, last = [], written + 1, time.time()
    if pending:
        _write_part(fs, out_root, pending, run, written)
        report.fused += len(pending)
    print(f"fuse (ray): run {run}", file=sys.stderr)
    return report
