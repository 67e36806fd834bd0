"""Registered models as MLflow pyfuncs: a version is logged "from code"
(``fusion/mlops/pyfunc_entry.py``) with the safetensors export and its config.json (which
names the family) and an ONNX export as artifacts, and no pickled object. Loading one
needs only the ``fusion`` package."""

from __future__ import annotations

import warnings
from pathlib import Path

import numpy as np

from fusion.engine.exports import load_model, read_config
from fusion.errors import BadInputError, FusionError

WEIGHTS = "weights"  # artifact key of the exported model folder
ONNX = "onnx"  # artifact key of the ONNX export
ENTRY = Path(__file__).with_name("pyfunc_entry.py")


def artifact(model_dir: Path, key: str) -> Path:
    """Where a logged pyfunc keeps artifact ``key``. The path is read from the downloaded
    ``MLmodel`` file, which is data: one that is absolute or leaves the model's folder is
    refused (exit 2, naming it), so a crafted version cannot load files from elsewhere."""
    import yaml

    flavor = yaml.safe_load((model_dir / "MLmodel").read_text())["flavors"]["python_function"]
    try:
        relative = str(flavor["artifacts"][key]["path"])
    except (KeyError, TypeError):
        raise FusionError(f"{model_dir}: the registered model has no {key!r} artifact") from None
    path = (model_dir / relative).resolve()
    if Path(relative).is_absolute() or not path.is_relative_to(model_dir.resolve()):
        raise BadInputError(model_dir / "MLmodel", f"artifact {key!r} path {relative!r} leaves "
                                                   "the model's folder")
    return path


def pyfunc_class():
    """The pyfunc class (MLflow imported only when a model is logged or loaded)."""
    import mlflow.pyfunc

    class Pyfunc(mlflow.pyfunc.PythonModel):
        """``predict(x)``: x is float32 in [0, 1], (2, H, W) for one pair (A, B stacked) or
        (N, 2, H, W) for N pairs of one size -> fused (H, W) or (N, H, W) in [0, 1]
        (any family; large images are tiled exactly)."""

        engine = None

        def load_context(self, context) -> None:
            import fusion.models  # noqa: F401  (registers the families)
            from fusion.family import get_family
            from fusion.inference.fuse import TorchEngine

            folder = context.artifacts[WEIGHTS]
            family = get_family(read_config(folder)["family"])
            self.engine = TorchEngine(load_model(folder), family)

        def predict(self, context, model_input: np.ndarray,
                    params: dict[str, str] | None = None) -> np.ndarray:
            x = np.asarray(model_input, dtype=np.float32)
            if x.ndim not in (3, 4) or x.shape[-3] != 2:
                raise ValueError(f"expected (2, H, W) or (N, 2, H, W) (sources A and B "
                                 f"stacked), got shape {x.shape}")
            if x.ndim == 3:
                return self.engine(x[0], x[1])
            return np.stack([self.engine(pair[0], pair[1]) for pair in x])

    return Pyfunc


def requirements() -> list[str]:
    """Pinned runtime needs of the pyfunc (given, so MLflow does not load the model in a
    subprocess to guess them)."""
    from importlib.metadata import version

    return [f"{name}=={version(name)}" for name in
            ("torch", "kornia", "safetensors", "numpy", "pillow", "opencv-python-headless",
             "pyarrow", "pyyaml", "mlflow")]


def log_pyfunc(artifacts: dict[str, str]):
    """Log the model ("from code") into the active run; returns MLflow's ModelInfo.

    The signature describes the input exactly, so no input example is logged: with one,
    MLflow loads the model in this process to validate it (seconds of torch), reading the
    artifacts back from the server; a server that died in that window was reported by
    MLflow's own warning and traceback before our one-line error."""
    import mlflow
    from mlflow.models import ModelSignature
    from mlflow.types import Schema, TensorSpec

    signature = ModelSignature(inputs=Schema([TensorSpec(np.dtype(np.float32), (2, -1, -1))]),
                               outputs=Schema([TensorSpec(np.dtype(np.float32), (-1, -1))]))
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=".*input example was not provided")
        return mlflow.pyfunc.log_model(name="model", python_model=str(ENTRY),
                                       artifacts=artifacts, signature=signature,
                                       pip_requirements=requirements())
