"""The end of a training phase: its model exported to ``train.out/phase<N>`` (with the loss
curve), the same for a local or a Ray run, and the export of a phase a warm start skips."""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Any

from fusion.engine.exports import export_model
from fusion.engine.reporting import write_curve
from fusion.engine.start import Start, lineage, phase_weights
from fusion.params import Params


def export(params: Params, phase: int, weights: tuple[Any, Any], info: dict[str, Any],
           start: Start) -> Path:
    """Export a phase's network (and critic) to ``train.out/phase<N>``."""
    code = params.family.network_module()
    model = code.build(params.config.net)
    model.load_state_dict(weights[0])
    critic = None
    if weights[1] is not None and hasattr(code, "build_critic"):
        critic = code.build_critic(params.config.net)
        critic.load_state_dict(weights[1])
    return export_model(params.train.phase_out(phase), params.model.family, params.config.net,
                        model, critic, {"phase": phase, "lineage": lineage(params, phase, start),
                                        **info})


def finish(params: Params, phase: int, state: dict[str, Any], name: str, start: Start) -> Path:
    """Write the loss curve (for ``dvc plots``) and export the model of a final state, with
    the training data it read (a folder or ``s3://``)."""
    write_curve(state["curve"], Path(params.train.curves) / f"phase{phase}_curve.csv")
    return export(params, phase, (state["model"], state.get("critic")),
                  {"run": name, "steps": state["step"], "resumed_at": state["resumes"],
                   "data": params.train.data}, start)


def pass_through(params: Params, phase: int, start: Start) -> Path | None:
    """A phase the recipe skips when warm-starting: its export is the weights it would have
    started from. Returns None when the phase trains."""
    if params.family.runs_phase(phase, start.warm):
        return None
    weights = phase_weights(params, phase, start)
    print(f"phase {phase}: warm start from {start.source}: the {params.model.family} recipe "
          f"does not train this phase; exporting its starting weights", file=sys.stderr)
    write_curve([], Path(params.train.curves) / f"phase{phase}_curve.csv")
    return export(params, phase, weights, {"run": "", "steps": 0, "resumed_at": [],
                                           "skipped": "warm start"}, start)
