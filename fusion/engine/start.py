"""Where a training phase starts: the previous phase's export, a warm start named by
``train.init`` (phase 1), or nothing (from scratch); and the lineage the weights carry."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from fusion.engine.exports import MODEL_FILE, Weights, load_weights, read_config
from fusion.errors import FusionError
from fusion.params import Params


@dataclass(frozen=True)
class Start:
    """Where phase 1 starts: an exported model (a warm start) or nothing (from scratch)."""

    folder: Path | None = None
    source: str = ""  # what it was resolved from (a registry URI and version, a folder)

    @property
    def warm(self) -> bool:
        return self.folder is not None


NO_START = Start()  # from scratch


def phase_input(params: Params, phase: int) -> Path:
    """The previous phase's export that phase ``phase`` (> 1) starts from."""
    init = params.train.phase_out(phase - 1)
    if not (init / MODEL_FILE).exists():
        raise FusionError(f"{init}: no phase {phase - 1} model (run `fusion train --phase "
                          f"{phase - 1}` first)")
    read_config(init)
    return init


def phase_weights(params: Params, phase: int, start: Start) -> Weights | None:
    """The weights phase ``phase`` starts from: the previous phase's export, the warm
    start (phase 1), or None (from scratch)."""
    if phase > 1:
        return load_weights(phase_input(params, phase))
    if start.warm:
        config = read_config(start.folder)
        if config["family"] != params.model.family:
            raise FusionError(f"train.init {start.source}: a {config['family']} model cannot "
                              f"start a {params.model.family} run")
        return load_weights(start.folder)
    return None


def lineage(params: Params, phase: int, start: Start) -> str:
    """The warm start a phase's weights descend from ("" from scratch), carried from export
    to export and tagged on the registered version."""
    if phase > 1:
        return read_config(phase_input(params, phase)).get("lineage", "")
    return start.source
