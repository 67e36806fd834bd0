"""DAE-Fuse as an MLflow pyfunc: two grey images in, the fused image out.

Logged as "models from code" (``fusion/mlflow_model.py``), so the MLflow model holds this
package's code reference, the safetensors export and config.json, and no pickled object.
Loading needs only the ``fusion`` package installed.
"""

from __future__ import annotations

from pathlib import Path

import mlflow.pyfunc
import numpy as np
import torch

from fusion.checkpoint import load_model
from fusion.model import DAEFuse

WEIGHTS = "weights"  # artifact key of the exported model folder


class FusionPyfunc(mlflow.pyfunc.PythonModel):
    """``predict({"a": HxW, "b": HxW})`` with float32 arrays in [0, 1] (or a list of such
    dicts) -> fused HxW float32 array(s) in [0, 1]."""

    model: DAEFuse | None = None

    def load_context(self, context: mlflow.pyfunc.PythonModelContext) -> None:
        self.model = load_model(context.artifacts[WEIGHTS])

    def predict(self, context, model_input, params=None):  # no hints: MLflow would parse them
        if isinstance(model_input, list):
            return [self._fuse(item) for item in model_input]
        return self._fuse(model_input)

    def _fuse(self, item: dict[str, np.ndarray]) -> np.ndarray:
        from fusion.inference import TileSpec, fuse_tensors

        a, b = (torch.as_tensor(np.asarray(item[k], dtype=np.float32))[None, None]
                for k in ("a", "b"))
        if a.shape != b.shape:
            raise ValueError(f"a and b differ in size: {tuple(a.shape[2:])} vs "
                             f"{tuple(b.shape[2:])}")
        with torch.inference_mode():
            return fuse_tensors(self.model, a, b, TileSpec())[0, 0].clamp(0, 1).numpy()


def is_mlflow_uri(ref: str) -> bool:
    return ref.startswith(("models:/", "runs:/")) or "://" in ref and not Path(ref).exists()


def load_fusion_model(ref: str, device: str | torch.device = "cpu") -> DAEFuse:
    """An exported model folder, or an MLflow model URI (``models:/name@champion``)."""
    if not is_mlflow_uri(ref):
        return load_model(ref, device)
    from fusion.tracking import connect

    connect("")
    pyfunc = mlflow.pyfunc.load_model(ref)
    return pyfunc.unwrap_python_model().model.to(device).eval()
