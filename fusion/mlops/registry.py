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

from fusion.engine.checkpoint import load_model, net_params, read_config
from fusion.errors import BadInputError, FusionError
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
        root = Path(mlflow.artifacts.download_artifacts(source))
    folder = root / artifact_path(root, WEIGHTS)
    read_config(folder)
    return folder, source


def artifact_path(model_dir: Path, key: str) -> str:
    """Where a logged pyfunc keeps artifact ``key``, relative to the model folder."""
    import yaml

    flavor = yaml.safe_load((model_dir / "MLmodel").read_text())["flavors"]["python_function"]
    try:
        return flavor["artifacts"][key]["path"]
    except KeyError:
        raise FusionError(f"{model_dir}: the registered model has no {key!r} artifact") from None


def load_ref(params: Params, ref: str, device: Any = "cpu"):
    """(family, network) of an export folder or a registry reference."""
    from fusion.models.registry import get_family

    folder = download(params, ref)[0] if is_uri(alias_uri(params, ref)) else Path(ref)
    config = read_config(folder)
    return get_family(config["family"]), load_model(folder, device)


def resolve_start(params: Params):
    """What ``train.init`` names: nothing, an export folder, or a registry model. With
    ``@champion`` and no champion yet, the family's bundled checkpoint, else scratch."""
    from fusion.engine.runs import Start

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
        if bundled is None or net_params(read_config(bundled)) != params.config.net:
            why = ("no bundled checkpoint" if bundled is None else
                   "a bundled checkpoint of other network sizes")
            print(f"train.init @champion: {params.model_name} has no champion and "
                  f"{params.model.family} {why}; training from scratch")
            return Start()
        print(f"train.init @champion: {params.model_name} has no champion yet; starting from "
              f"the bundled checkpoint {bundled}")
        return Start(bundled, f"bundled:{params.model.family}")
    return Start(folder, source)


def pyfunc_class():
    """The pyfunc class (MLflow imported only when a model is logged or loaded)."""
    import mlflow.pyfunc

    class Pyfunc(mlflow.pyfunc.PythonModel):
        """``predict(x)``: x is float32 in [0, 1], (2, H, W) for one pair (A, B stacked) or
        (N, 2, H, W) for N pairs of one size -> fused (H, W) or (N, H, W) in [0, 1]
        (any family; large images are tiled exactly)."""

        engine = None

        def load_context(self, context) -> None:
            from fusion.inference.fuse import TorchEngine
            from fusion.models.registry import get_family

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
    """Log the model ("from code") into the active run; returns MLflow's ModelInfo."""
    import mlflow
    from mlflow.models import ModelSignature
    from mlflow.types import Schema, TensorSpec

    example = np.stack([np.zeros((32, 32), np.float32), np.ones((32, 32), np.float32)])
    signature = ModelSignature(inputs=Schema([TensorSpec(np.dtype(np.float32), (2, -1, -1))]),
                               outputs=Schema([TensorSpec(np.dtype(np.float32), (-1, -1))]))
    return mlflow.pyfunc.log_model(name="model", python_model=str(ENTRY), artifacts=artifacts,
                                   signature=signature, input_example=example,
                                   pip_requirements=requirements())
