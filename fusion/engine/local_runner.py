"""``fusion train --local``: one phase in this process, without Ray (the same loop)."""

from __future__ import annotations

import shutil
import sys
from pathlib import Path

from fusion.device import resolve_device
from fusion.engine.batches import PatchStream
from fusion.engine.checkpoint import checkpoints, load_state, newest_good, save_state
from fusion.engine.fingerprints import run_name
from fusion.engine.phase_export import finish, pass_through
from fusion.engine.reporting import Sink, reporter
from fusion.engine.start import NO_START, Start, phase_weights
from fusion.engine.trainer import Hooks, Trainer
from fusion.params import Params


def train_local(params: Params, phase: int, start: Start = NO_START, fresh: bool = False,
                sink: Sink | None = None) -> Path:
    """Train one phase in this process (resuming its checkpoints in
    ``train.checkpoints/<run>/``) and export the model."""
    skipped = pass_through(params, phase, start)
    if skipped is not None:
        return skipped
    t = params.train
    init = phase_weights(params, phase, start)
    name = run_name(params, phase, start)
    folder = Path(t.checkpoints) / name
    if fresh:
        shutil.rmtree(folder, ignore_errors=True)
    trainer = Trainer(params, phase, resolve_device(t.device), init=init)
    state = newest_good(checkpoints(folder), load_state, name)
    if state is not None:
        trainer.load(state)
        print(f"phase {phase}: resuming {name} from step {trainer.step}", file=sys.stderr)
    stream = PatchStream(t.data, "train", t.batch_size, t.seed, crop=t.crop)

    shown = reporter(phase, trainer.steps, sink)

    def save(step: int, state: dict) -> None:
        save_state(state, folder / f"step-{step:07d}")
        for old in checkpoints(folder)[:-t.keep_checkpoints]:
            shutil.rmtree(old)
        shown.save(step, state)

    if sink is not None:
        sink.open()
    try:
        trainer.fit(stream.batch, Hooks(report=shown.report, save=save))
    finally:
        if sink is not None:
            sink.close()
    return finish(params, phase, trainer.state(), name, start)
