"""Typed view of ``params.yaml``: the one source of truth for every stage.

DVC stages, the CLI and the flows all call :func:`load_params`; ``--set section.key=value``
overrides use the same syntax as ``dvc exp run -S`` and are type-checked here.
"""

from __future__ import annotations

import dataclasses
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from fusion.errors import FusionError

DEFAULT_PARAMS = Path("params.yaml")


@dataclass(frozen=True)
class DataParams:
    """The ``data`` section: where raw pairs live and how ``prepare`` cuts them."""

    raw: list[str] = field(default_factory=lambda: ["data/sample/roadscene"])
    out: str = "data/prepared"
    summary: str = "reports/prepare.json"
    exclude: list[str] = field(default_factory=list)
    val_ratio: float = 0.1
    patch_size: int = 128
    stride: int = 64
    min_patch_std: float = 0.02
    shard_max_mb: float = 64.0
    strict: bool = False


@dataclass(frozen=True)
class MetricParams:
    """The ``metrics`` section: definition variants; defaults reproduce the published evaluator."""

    ssim_data_range: float = 2.0
    mi_unit: str = "nats"

    def __post_init__(self) -> None:
        if self.mi_unit not in ("nats", "bits"):
            raise FusionError(f"metrics.mi_unit must be 'nats' or 'bits', got {self.mi_unit!r}")
        if self.ssim_data_range <= 0:
            raise FusionError("metrics.ssim_data_range must be positive")


@dataclass(frozen=True)
class Params:
    data: DataParams = field(default_factory=DataParams)
    metrics: MetricParams = field(default_factory=MetricParams)


def _check_type(value: Any, hint: Any, where: str) -> Any:
    """Return ``value`` coerced to ``hint`` (int -> float only) or raise naming ``where``."""
    origin = typing.get_origin(hint)
    if origin is list:
        (item,) = typing.get_args(hint)
        if not isinstance(value, list):
            raise FusionError(f"{where}: expected a list, got {value!r}")
        return [_check_type(v, item, f"{where}[{i}]") for i, v in enumerate(value)]
    if origin in (typing.Union, types.UnionType):
        if value is None and type(None) in typing.get_args(hint):
            return None
        (hint,) = [a for a in typing.get_args(hint) if a is not type(None)]
    if hint is float and isinstance(value, int) and not isinstance(value, bool):
        return float(value)
    if hint is bool and not isinstance(value, bool):
        raise FusionError(f"{where}: expected true/false, got {value!r}")
    if not isinstance(value, hint) or (hint is int and isinstance(value, bool)):
        raise FusionError(f"{where}: expected {hint.__name__}, got {value!r}")
    return value


def _build(cls: type, raw: dict[str, Any], where: str) -> Any:
    if not isinstance(raw, dict):
        raise FusionError(f"{where}: expected a mapping, got {raw!r}")
    hints = typing.get_type_hints(cls)
    names = {f.name for f in dataclasses.fields(cls)}
    unknown = sorted(set(raw) - names)
    if unknown:
        raise FusionError(f"{where}: unknown key(s) {unknown}; known: {sorted(names)}")
    kwargs = {}
    for name, value in raw.items():
        hint = hints[name]
        sub = f"{where}.{name}" if where else name
        if dataclasses.is_dataclass(hint):
            kwargs[name] = _build(hint, value, sub)
        else:
            kwargs[name] = _check_type(value, hint, sub)
    return cls(**kwargs)


def apply_overrides(raw: dict[str, Any], overrides: list[str]) -> dict[str, Any]:
    """Apply ``section.key=value`` strings (values parsed as YAML) to a params mapping."""
    for item in overrides:
        key, sep, text = item.partition("=")
        if not sep or not key:
            raise FusionError(f"--set {item!r}: expected section.key=value")
        node = raw
        *parents, leaf = key.split(".")
        for part in parents:
            node = node.setdefault(part, {})
            if not isinstance(node, dict):
                raise FusionError(f"--set {item!r}: {part!r} is not a section")
        node[leaf] = yaml.safe_load(text) if text else ""
    return raw


def load_params(path: str | Path | None = None, overrides: list[str] | None = None) -> Params:
    """Read ``params.yaml`` (missing sections take their defaults) and apply overrides."""
    path = Path(path) if path else DEFAULT_PARAMS
    raw: dict[str, Any] = {}
    if path.exists():
        try:
            raw = yaml.safe_load(path.read_text()) or {}
        except yaml.YAMLError as exc:
            raise FusionError(f"{path}: not valid YAML: {exc}") from exc
    elif path != DEFAULT_PARAMS:
        raise FusionError(f"{path}: params file not found")
    return _build(Params, apply_overrides(raw, list(overrides or [])), "")


def to_dict(params: Params) -> dict[str, Any]:
    """Plain mapping of the params, e.g. for logging or writing a params file."""
    return dataclasses.asdict(params)
