"""ONNX export and an onnxruntime engine: the whole-image path of a family, portable."""

from __future__ import annotations

import copy
import json
import warnings
from collections import OrderedDict
from pathlib import Path
from typing import Any

import numpy as np

from fusion.errors import BadInputError, FusionError
from fusion.inference.fuse import TileSpec, fuse_planes

META = "fusion"  # ONNX metadata key: family, padding multiple
AXES = {2: "height", 3: "width"}  # the inputs' and output's dynamic dimensions


def export_onnx(model: Any, family: Any, path: Path, opset: int = 18) -> Path:
    """Write the network's whole-image fusion as ONNX with dynamic height and width.

    The graph takes sources already padded to a multiple of the network's grid (the engine
    pads and crops), so no size-dependent Python runs inside it."""
    import onnx
    import torch

    from fusion.models.layers import fold_norms

    class Whole(torch.nn.Module):
        def __init__(self, net: torch.nn.Module) -> None:
            super().__init__()
            self.net = net

        def forward(self, a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
            return self.net.fuse(a, b)

    # at least 64 x 96, so that the two-scale blur's reflect padding fits while tracing
    unit = model.multiple * -(-16 // model.multiple)
    example = (torch.rand(1, 1, 4 * unit, 6 * unit), torch.rand(1, 1, 4 * unit, 6 * unit))
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp")
    try:
        # a private copy in the default memory format: the torch engine may have made the
        # caller's model channels-last, whose strides the exporter cannot reshape
        net = fold_norms(copy.deepcopy(model).eval().to(memory_format=torch.contiguous_format))
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # the tracer's notes on constant shapes
            # the TorchScript exporter: under a second per family here, where the dynamo
            # exporter took about 25 s, with the same outputs (checked in the tests)
            torch.onnx.export(Whole(net), example, str(tmp), input_names=["a", "b"],
                              output_names=["fused"], opset_version=opset, dynamo=False,
                              dynamic_axes={"a": AXES, "b": AXES, "fused": AXES})
        proto = onnx.load(str(tmp))
        entry = proto.metadata_props.add()
        entry.key = META
        entry.value = json.dumps({"family": family.name, "multiple": model.multiple})
        onnx.save(proto, str(tmp))
        tmp.replace(path)
    except Exception as exc:
        tmp.unlink(missing_ok=True)
        if isinstance(exc, OSError):
            raise BadInputError(path, f"cannot write ({exc})") from exc
        raise FusionError(f"{family.name}: the whole-image path does not export to ONNX "
                          f"({type(exc).__name__}: {str(exc).splitlines()[0][:200]})") from exc
    return path


def _session(path: Path, threads: int, size: tuple[int, int] | None = None,
             gpu: bool = False) -> Any:
    """An onnxruntime session, on the CPU or (``gpu``) CUDA first; with ``size``, height and
    width fixed to it."""
    import onnxruntime as ort

    options = ort.SessionOptions()
    options.intra_op_num_threads = threads
    options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    for name, value in zip(AXES.values(), size or (), strict=False):
        options.add_free_dimension_override_by_name(name, value)
    providers = ["CUDAExecutionProvider"] if gpu else []
    return ort.InferenceSession(str(path), options,
                                providers=[*providers, "CPUExecutionProvider"])


class OnnxEngine:
    """Fuses with an exported ONNX file in onnxruntime (CPU): whole images, and overlapping
    windows above ``tiles.exact_pixels`` (exact tiling needs the torch model).

    The file's height and width are dynamic. A size met a second time gets a session of
    its own with them fixed, which onnxruntime plans about 6% faster (measured on a 768x576
    pair; a session costs about 0.08 s to make), so a folder of one camera's pairs gains and
    a folder of all-different sizes pays nothing."""

    explains = False
    KEPT = 4  # fixed-size sessions kept, the least recently used dropped first

    def __init__(self, path: Path, session: Any, multiple: int, family: str,
                 threads: int, gpu: bool = False, tiles: TileSpec | None = None) -> None:
        self.path, self.session, self.multiple, self.family = path, session, multiple, family
        self.threads, self.gpu, self.tiles = threads, gpu, tiles or TileSpec()
        self.seen: set[tuple[int, int]] = set()
        self.fixed: OrderedDict[tuple[int, int], Any] = OrderedDict()

    @classmethod
    def open(cls, path: str | Path, threads: int = 0, gpu: bool = False,
             tiles: TileSpec | None = None) -> OnnxEngine:
        path = Path(path)
        if path.suffix != ".onnx" or not path.is_file():
            raise BadInputError(path, "--engine onnxruntime needs an .onnx file from "
                                      "`fusion export --onnx`")
        try:
            session = _session(path, threads, gpu=gpu)
        except Exception as exc:  # onnxruntime raises its own exception types
            raise BadInputError(path, f"not a readable ONNX model ({exc})") from exc
        meta = json.loads(session.get_modelmeta().custom_metadata_map.get(META, "{}"))
        if "multiple" not in meta:
            raise BadInputError(path, "not a fusion model export (no fusion metadata)")
        return cls(path, session, int(meta["multiple"]), meta["family"], threads, gpu, tiles)

    def _session_for(self, size: tuple[int, int]) -> Any:
        if size in self.fixed:
            self.fixed.move_to_end(size)
            return self.fixed[size]
        if size not in self.seen:
            self.seen.add(size)
            return self.session
        self.fixed[size] = _session(self.path, self.threads, size, self.gpu)
        if len(self.fixed) > self.KEPT:
            self.fixed.popitem(last=False)
        return self.fixed[size]

    def __call__(self, a: np.ndarray, b: np.ndarray) -> np.ndarray:
        return fuse_planes(self._run, a, b, self.tiles)

    def _run(self, a: np.ndarray, b: np.ndarray) -> np.ndarray:
        h, w = a.shape
        ph, pw = -h % self.multiple, -w % self.multiple
        mode = "reflect" if ph < h and pw < w else "edge"
        planes = [np.pad(x.astype(np.float32), ((0, ph), (0, pw)), mode=mode)[None, None]
                  for x in (a, b)]
        session = self._session_for(planes[0].shape[-2:])
        (fused,) = session.run(None, {"a": planes[0], "b": planes[1]})
        return np.clip(fused[0, 0, :h, :w], 0.0, 1.0)

    def explain(self, a: np.ndarray, b: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        raise FusionError("--explain needs --engine torch")
