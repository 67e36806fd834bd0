"""The family registry: every fusion family the pipeline can train, by name (as timm's
models). A base module: it describes families as data and never imports one, so params can
type each family's section without any stage knowing networks.

A family registers, once, from its own folder under ``fusion/models/`` (importing
``fusion.models`` registers them all; the CLI, the flows and the workers do):

- ``config``: the dataclass of its ``model.<family>`` section in params.yaml: network sizes
  (``net``), the loss weights of each phase (``phase1``, ``phase2`` ...) and the default
  search space over those weights;
- ``phases``: its training recipe, one :class:`Phase` per phase: the parts it keeps frozen
  (the rest are updated) and whether discriminators train beside it;
- ``module``: its network (imported on first use, so reading params and checking inputs
  never imports torch): ``build(net)`` and, for adversarial recipes, ``build_critic(net)``;
  ``losses``: its training objectives, ``losses_for(phase, a, b, outputs, weights,
  critic_logits)`` (imported only to train).

``get_family`` and ``list_families`` (and ``fusion.models.create_model``) are the registry's
face; the engine, inference, evaluation and MLOps code only ever ask the registry, never a
family by name.
"""

from __future__ import annotations

import importlib
from dataclasses import dataclass, field
from pathlib import Path
from types import ModuleType
from typing import Any

from fusion.errors import FusionError


@dataclass(frozen=True)
class Phase:
    """One phase of a recipe: what it leaves alone and what it is for."""

    name: str  # e.g. "features", "fusion"
    frozen: tuple[str, ...] = ()  # child modules of the network not updated in this phase
    adversarial: bool = False  # discriminators (``build_critic``) train alongside
    fuses: bool = True  # ends with a usable fusion model (scored by the search)


@dataclass(frozen=True)
class WeightRange:
    """One tuned loss weight, ``phase<N>.<weight>`` of the family's section, and its range."""

    name: str
    low: float
    high: float
    log: bool = False  # sample on a log scale (weights spanning decades)

    def __post_init__(self) -> None:
        if not self.low < self.high or self.low < 0 or (self.log and self.low <= 0):
            raise FusionError(f"search space {self.name}: need 0 <= low < high (low > 0 "
                              f"with log), got [{self.low}, {self.high}]")


@dataclass(frozen=True)
class Family:
    """A registered model family."""

    name: str  # registry key; the default registered-model name in MLflow
    config: type  # dataclass of the ``model.<name>`` params section
    phases: tuple[Phase, ...]
    module: str  # dotted path of the network code (build, build_critic)
    losses: str  # dotted path of the losses (losses_for)
    exact_tiling: bool = True  # tiled inference reproduces the whole image (fusion.inference)
    warm_phases: tuple[int, ...] = ()  # phases a warm start runs (from train.init); () = all
    profiles: dict[str, dict[str, Any]] = field(default_factory=dict)  # e.g. {"paper": {...}}
    pretrained: str = ""  # bundled starting checkpoint, relative to the family folder
    explains: bool = False  # the network offers ``explain(a, b)`` (e.g. contribution maps)

    def network_module(self) -> ModuleType:
        """The family's network code: ``build(net)``, ``build_critic(net)`` (imported on
        first use)."""
        return importlib.import_module(self.module)

    def loss_module(self) -> ModuleType:
        """The family's losses: ``losses_for(...)`` (imported on first use)."""
        return importlib.import_module(self.losses)

    def phase(self, number: int) -> Phase:
        if not 1 <= number <= len(self.phases):
            raise FusionError(f"{self.name}: phase must be 1..{len(self.phases)}, got {number}")
        return self.phases[number - 1]

    def runs_phase(self, number: int, warm: bool) -> bool:
        """Whether a run trains ``number``: every phase from scratch, the recipe's
        ``warm_phases`` when starting from a trained model."""
        return not warm or not self.warm_phases or number in self.warm_phases

    def loss(self, config: Any, number: int) -> Any:
        """The loss weights of phase ``number`` in a config of this family."""
        self.phase(number)
        return getattr(config, f"phase{number}")

    def check(self, config: Any, where: str) -> None:
        """Every phase has its loss section and the search space names float weights of them."""
        for number in range(1, len(self.phases) + 1):
            if not hasattr(config, f"phase{number}"):
                raise FusionError(f"{where}: no phase{number} loss section")
        known = {f"phase{n}.{k}" for n in range(1, len(self.phases) + 1)
                 for k, v in vars(getattr(config, f"phase{n}")).items() if isinstance(v, float)}
        for r in config.search:
            if r.name not in known:
                raise FusionError(f"{where}.search: {r.name!r} is not a loss weight of "
                                  f"{self.name}; known: {sorted(known)}")

    def pretrained_folder(self) -> Path:
        """Where the bundled starting checkpoint lives (inside the family's folder)."""
        if not self.pretrained:
            raise FusionError(f"model family {self.name} has no bundled checkpoint folder")
        package = importlib.import_module(self.config.__module__)
        return Path(package.__file__).parent / self.pretrained

    def pretrained_path(self) -> Path | None:
        """The bundled checkpoint, if one has been built."""
        if not self.pretrained:
            return None
        folder = self.pretrained_folder()
        return folder if (folder / "config.json").exists() else None


_FAMILIES: dict[str, Family] = {}
_DEFAULT: list[str] = []  # the family params.yaml's model.family names when it names none


def register_family(family: Family, default: bool = False) -> Family:
    """Add a family (called by each family's package); a name registers once. ``default``:
    the family ``model.family`` names when params.yaml names none."""
    if family.name in _FAMILIES and _FAMILIES[family.name] is not family:
        raise ValueError(f"model family {family.name!r} is registered twice")
    _FAMILIES[family.name] = family
    if default and family.name not in _DEFAULT:
        _DEFAULT.append(family.name)
    return family


def _registered() -> dict[str, Family]:
    if not _FAMILIES:
        raise FusionError("no model family is registered: import fusion.models first (the "
                          "CLI, the flows and the workers do)")
    return _FAMILIES


def list_families() -> list[str]:
    return sorted(_registered())


def default_family() -> str:
    _registered()
    return _DEFAULT[0]


def get_family(name: str) -> Family:
    try:
        return _registered()[name]
    except KeyError:
        raise FusionError(f"unknown model family {name!r}; known: {sorted(_FAMILIES)}") from None


TOP_LEVEL = ("train",)  # profile keys that set a section of params.yaml, not the family's


def profile_update(family: str, name: str) -> dict[str, Any]:
    """A family's named profile as a params update: sizes and loss weights go to its section
    (``paper`` sizes), ``train`` to the train section (``hour``: the step counts that make
    an hour of training on 2 cores for this family)."""
    fam = get_family(family)
    if name not in fam.profiles:
        raise FusionError(f"{family}: no profile {name!r}; known: {sorted(fam.profiles)}")
    profile = fam.profiles[name]
    own = {k: v for k, v in profile.items() if k not in TOP_LEVEL}
    return {**{k: profile[k] for k in TOP_LEVEL if k in profile}, "model": {family: own}}
