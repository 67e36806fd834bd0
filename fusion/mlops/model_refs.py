"""Model references, resolved: an export folder, ``models:/<name>@<alias>`` or
``models:/<name>/<version>`` in the MLflow registry, or ``@<alias>`` of the active family's
registered model; what ``train.init`` names as a warm start; and a reference opened as an
inference engine. Every command that reads the registry resolves the tracking URI the same
way (``fusion.mlops.connection``)."""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING

from fusion.device import resolve_device
from fusion.engine.exports import load_model, net_params, read_config
from fusion.engine.start import Start
from fusion.errors import BadInputError
from fusion.family import Family, get_family
from fusion.inference.fuse import Engine, TileSpec, TorchEngine
from fusion.mlops.connection import answering, connect
from fusion.mlops.pyfunc import WEIGHTS, artifact
from fusion.params import Params

if TYPE_CHECKING:
    from torch import nn

CHALLENGER, CHAMPION = "challenger", "champion"


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


def version_of(params: Params, ref: str) -> str:
    """``models:/<name>/<version>`` that a registry reference names now (an alias is
    followed); a tracking server that does not answer is a TransientError."""
    from mlflow import MlflowClient

    uri = alias_uri(params, ref)
    with answering(connect(params.mlflow)):
        _check_alias(uri)
        name, _, alias = uri.removeprefix("models:/").partition("@")
        if not alias:
            return uri
        return f"models:/{name}/{MlflowClient().get_model_version_by_alias(name, alias).version}"


def fetch(params: Params, ref: str) -> tuple[Path, str]:
    """(local folder of the version's pyfunc, "models:/name/version") of a registry
    reference; its artifacts by key: ``fusion.mlops.pyfunc.artifact``."""
    import mlflow

    source = version_of(params, ref)
    with answering(connect(params.mlflow)):
        return Path(mlflow.artifacts.download_artifacts(source)), source


def download(params: Params, ref: str) -> tuple[Path, str]:
    """(local export folder, "models:/name/version") of a registry reference."""
    root, source = fetch(params, ref)
    folder = artifact(root, WEIGHTS)
    read_config(folder)
    return folder, source


def load_ref(params: Params, ref: str, device: str = "cpu") -> tuple[Family, nn.Module]:
    """(family, network) of an export folder or a registry reference."""
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




def open_engine(params: Params, ref: str, kind: str = "torch", device: str = "",
                tiles: TileSpec | None = None, threads: int = 0,
                precision: str = "auto") -> Engine:
    """A model reference (or, for onnxruntime, an ``.onnx`` file from ``fusion export``) as
    an inference engine; a model folder's config is checked before torch is imported."""
    if kind == "onnxruntime":
        from fusion.inference.onnx import OnnxEngine

        return OnnxEngine.open(ref, threads=threads, tiles=tiles)
    if not is_uri(alias_uri(params, ref)):
        read_config(ref)
    where = str(resolve_device(device or params.train.device))
    family, model = load_ref(params, ref, where)
    return TorchEngine(model, family, tiles or TileSpec(), where, precision)
