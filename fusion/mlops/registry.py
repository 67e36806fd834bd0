"""The MLflow model registry: models as pyfuncs, loading any model reference, warm starts.

A registered version is a pyfunc logged "from code" (``fusion/mlops/model_code.py``): it
holds this package's code reference, the safetensors export and its config.json (which
names the family), and no pickled object. Loading needs only the ``fusion`` package.
Every command that reads the registry resolves the tracking URI the same way
(``fusion.mlops.tracking.connect``).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np

from fusion.engine.checkpoint import load_model, read_config
from fusion.engine.runs import Start
from fusion.errors import BadInputError
from fusion.params import Params

WEIGHTS = "weights"  # artifact key of the exported model folder
ONNX = "onnx"  # artifact key of the ONNX export
ENTRY = Path(__file__).with_name("model_code.py")


def is_uri(ref: str) -> bool:
    return ref.startswith(("models:/", "runs:/")) or ("://" in ref and not Path(ref).exists())


def alias_uri(params: Params, ref: str) -> str:
    """``@alias`` is short for ``models:/<this family's registered model>@alias``."""
    return f"models:/{params.model_name}{ref}" if ref.startswith("@") else ref


def _check_alias(uri: str) -> None:
    """A clear error for ``models:/name@alias`` when the alias (or model) does not exist,
    listing what does."""
    from mlflow import MlflowClient
    from mlflow.exceptions import MlflowException

    name, _, alias = uri.removeprefix("models:/").partition("@")
    if not alias:
        return
    client = MlflowClient()
    try:
        model = client.get_registered_model(name)
    except MlflowException as exc:
        names = sorted(m.name for m in client.search_registered_models())
        raise BadInputError(Path(uri), f"no registered model {name!r}; known: {names}") from exc
    if alias not in model.aliases:
        versions = sorted(int(v.version) for v in client.search_model_versions(
            f"name = '{name}'"))
        aliases = ", ".join(f"{a} -> {v}" for a, v in sorted(model.aliases.items())) or "none"
        raise BadInputError(Path(uri), f"model {name!r} has no alias {alias!r} (aliases: "
                                       f"{aliases}; versions: {versions})")


def download(params: Params, ref: str) -> tuple[Path, str]:
    """(local export folder, "models:/name/version") of a registry reference."""
    import mlflow
    from mlflow import MlflowClient

    from fusion.mlops.tracking import answering, connect

    uri = alias_uri(params, ref)
    tracking = connect(params.mlflow)
    with answering(tracking):
        _check_alias(uri)
        name, _, alias = uri.removeprefix("models:/").partition("@")
        source = uri
        if alias:
            version = MlflowClient().get_model_version_by_alias(name, alias).version
            source = f"models:/{name}/{version}"
        folder = Path(mlflow.artifacts.download_artifacts(f"{source}/artifacts/{WEIGHTS}"))
    read_config(folder)
    return folder, source


def load_ref(params: Params, ref: str, device: Any = "cpu"):
    """(family, network) of an export folder or a registry reference."""
    from fusion.models.registry import get_family

    folder = download(params, ref)[0] if is_uri(alias_uri(params, ref)) else Path(ref)
    config = read_config(folder)
    return get_family(config["family"]), load_model(folder, device)


def resolve_start(params: Params) -> Start:
    """What ``train.init`` names: nothing, an export folder, or a registry model. With
    ``@champion`` and no champion yet, the family's bundled checkpoint, else scratch."""
    ref = params.train.init
    if not ref:
        return Start()
    if not is_uri(alias_uri(params, ref)):
        read_config(ref)
        return Start(Path(ref), str(ref))
    try:
        folder, source = download(params, ref)
    except BadInputError:
        if ref != "@champion":
            raise
        bundled = params.family.pretrained_path()
        if bundled is None:
            print(f"train.init @champion: {params.model_name} has no champion and "
                  f"{params.model.family} no bundled checkpoint; training from scratch")
            return Start()
        print(f"train.init @champion: {params.model_name} has no champion yet; starting from "
              f"the bundled checkpoint {bundled}")
        return Start(bundled, f"bundled:{params.model.family}")
    return Start(folder, source)


def pyfunc_class():
    """The pyfunc class (MLflow imported only when a model is logged or loaded)."""
    import mlflow.pyfunc

    class Pyfunc(mlflow.pyfunc.PythonModel):
        """``predict([{"a": HxW, "b": HxW}, ...])`` with float32 arrays in [0, 1] -> a list
        of fused HxW float32 arrays in [0, 1] (any family; tiles exactly when large)."""

        engine = None

        def load_context(self, context) -> None:
            from fusion.inference.fuse import TorchEngine
            from fusion.models.registry import get_family

            folder = context.artifacts[WEIGHTS]
            family = get_family(read_config(folder)["family"])
            self.engine = TorchEngine(load_model(folder), family)

        def predict(self, context, model_input: list[dict[str, Any]],
                    params: dict[str, Any] | None = None) -> list[Any]:
            return [self._fuse(item) for item in model_input]

        def _fuse(self, item: dict[str, Any]) -> np.ndarray:
            a, b = (np.asarray(item[k], dtype=np.float32) for k in ("a", "b"))
            if a.shape != b.shape or a.ndim != 2:
                raise ValueError(f"a and b must be HxW arrays of one size, got {a.shape} "
                                 f"and {b.shape}")
            return self.engine(a, b)

    return Pyfunc


def requirements() -> list[str]:
    """Pinned runtime needs of the pyfunc (given, so MLflow does not load the model in a
    subprocess to guess them)."""
    from importlib.metadata import version

    return [f"{name}=={version(name)}" for name in
            ("torch", "torchvision", "timm", "kornia", "safetensors", "numpy", "pillow",
             "pyarrow", "pyyaml", "mlflow")]


def log_pyfunc(artifacts: dict[str, str]):
    """Log the model ("from code") into the active run; returns MLflow's ModelInfo."""
    import mlflow

    example = [{"a": np.zeros((32, 32), np.float32), "b": np.ones((32, 32), np.float32)}]
    return mlflow.pyfunc.log_model(name="model", python_model=str(ENTRY), artifacts=artifacts,
                                   input_example=example, pip_requirements=requirements())
