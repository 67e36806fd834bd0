"""Training runs: names, starting points, checkpoints that are skipped when bad, exports.

A run's name is its phase plus a hash of everything that shapes its result: the family and
its sizes, the phase's loss weights, the training settings, the dataset manifest, the
training code (``fusion.engine.code``) and the weights it starts from (the previous phase's
export, or the warm start). A rerun of the same configuration resumes its own checkpoints
(e.g. after a crash); a different one never does.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import shutil
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol

from fusion.engine.batches import PatchStream
from fusion.engine.checkpoint import (
    Weights,
    export_model,
    load_state,
    load_weights,
    read_config,
    save_state,
    weights_digest,
)
from fusion.engine.code import TRAINING_CODE
from fusion.engine.trainer import Hooks, Trainer, resolve_device
from fusion.errors import FusionError
from fusion.files import sha256_tree, write_text
from fusion.params import Params

REPO = Path(__file__).resolve().parents[2]  # where TRAINING_CODE's paths start
RESULT_KEYS = ("batch_size", "crop", "lr", "d_lr", "lr_min_ratio", "grad_clip", "seed")


@dataclass(frozen=True)
class Start:
    """Where phase 1 starts: an exported model (a warm start) or nothing (from scratch)."""

    folder: Path | None = None
    source: str = ""  # what it was resolved from (a registry URI and version, a folder)

    @property
    def warm(self) -> bool:
        return self.folder is not None


NO_START = Start()  # from scratch


def code_digest() -> str:
    return sha256_tree([REPO / p for p in TRAINING_CODE.values()], REPO)


def _digest(key: dict[str, Any]) -> str:
    return hashlib.sha256(json.dumps(key, sort_keys=True, default=str).encode()).hexdigest()


def _shaping(params: Params, phase: int) -> dict[str, Any]:
    """What shapes phase ``phase``'s weights apart from its starting weights."""
    t = params.train
    return {"family": params.model.family, "net": dataclasses.asdict(params.config.net),
            "loss": dataclasses.asdict(params.family.loss(params.config, phase)),
            "train": {**{k: getattr(t, k) for k in RESULT_KEYS}, "steps": t.steps[phase - 1]},
            "manifest": manifest_digest(params), "code": code_digest()}


def manifest_digest(params: Params) -> str:
    """SHA-256 of the prepared dataset's manifest (local folder or S3), "missing" if none."""
    from fusion.engine.batches import source

    data = source(params.train.data, params.ray.storage_endpoint).read("manifest.parquet")
    return hashlib.sha256(data).hexdigest() if data is not None else "missing"


def start_digest(params: Params, phase: int, start: Start) -> str:
    """SHA-256 of the weights phase ``phase`` starts from ("" from scratch)."""
    if phase > 1:
        return weights_digest(phase_input(params, phase))
    return weights_digest(start.folder) if start.warm else ""


def run_name(params: Params, phase: int, start: Start = NO_START,
             workers: int | None = None) -> str:
    """``phase{N}-<hash>`` for single-process runs; Ray runs (``workers`` set) are named
    after their stage, ``train_phase{N}-<hash>``, and hash the worker count too (it sets
    the global batch)."""
    key = {"phase": phase, **_shaping(params, phase), "init": start_digest(params, phase, start)}
    if workers is not None:
        key["workers"] = workers
    return f"{'train_' if workers is not None else ''}phase{phase}-{_digest(key)[:12]}"


def fingerprint(params: Params) -> str:
    """SHA-256 of the data and params a trained model comes from (not its starting weights:
    a warm start from each new champion is still the same configuration); the retrain flow
    skips training when the champion came from the same fingerprint."""
    return _digest({**{f"phase{n}": _shaping(params, n) for n in
                       range(1, len(params.family.phases) + 1)},
                    "data": dataclasses.asdict(params.data), "workers": params.ray.num_workers,
                    "init": params.train.init})


def phase_input(params: Params, phase: int) -> Path:
    """The previous phase's export that phase ``phase`` (> 1) starts from."""
    init = params.train.phase_out(phase - 1)
    if not (init / "model.safetensors").exists():
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


def checkpoints(folder: Path) -> list[Path]:
    """Checkpoint folders of a local run, oldest first (temp folders are never listed)."""
    return sorted(p for p in folder.glob("step-*") if p.is_dir())


def newest_good(candidates: list[Any], read: Callable[[Any], dict[str, Any]],
                run: str) -> dict[str, Any] | None:
    """The newest checkpoint state that verifies, warning about each bad one skipped.

    ``read`` raises FusionError for a bad checkpoint. No good one among existing ones is an
    error (exit 2): resuming cannot continue and starting over must be asked for.
    """
    bad = []
    for candidate in reversed(candidates):
        try:
            return read(candidate)
        except FusionError as exc:
            print(f"warning: skipping checkpoint {candidate}: {exc}", file=sys.stderr)
            bad.append(str(candidate))
    if bad:
        raise FusionError(f"{run}: none of its {len(bad)} checkpoint(s) is readable "
                          "(see the warnings); rerun with --fresh to start this run over")
    return None


def write_curve(rows: list[dict[str, float]], path: Path) -> None:
    names = list(dict.fromkeys(k for row in rows for k in row))
    lines = [",".join(names)]
    for row in rows:
        lines.append(",".join("" if k not in row else (f"{row[k]:.3f}" if k == "time" else
                                                        f"{row[k]:.6g}") for k in names))
    write_text(path, "\n".join(lines) + "\n")


class Sink(Protocol):
    """Where a phase's steps are logged live (an MLflow run: ``fusion.mlops.tracking``)."""

    def open(self) -> None: ...

    def log(self, step: int, metrics: dict[str, float]) -> None: ...

    def close(self) -> None: ...


def reporter(phase: int, total: int, sink: Sink | None) -> Hooks:
    """Hooks of the process that reports: one printed line per logged step (losses,
    elapsed time), the same metrics to ``sink``, and each checkpoint's step."""
    begin = time.perf_counter()

    def report(step: int, metrics: dict[str, float]) -> None:
        elapsed = time.perf_counter() - begin
        terms = " ".join(f"{k}={v:.4f}" for k, v in metrics.items() if k != "lr")
        print(f"phase {phase} step {step}/{total} ({elapsed:.0f}s) {terms}", file=sys.stderr,
              flush=True)
        if sink is not None:
            sink.log(step, metrics)

    def save(step: int, state: dict[str, Any]) -> None:
        if sink is not None:
            sink.log(step, {"checkpoint_step": step})
    return Hooks(report=report, save=save)


def export(params: Params, phase: int, weights: tuple[Any, Any], info: dict[str, Any],
           start: Start) -> Path:
    """Export a phase's network (and critic) to ``train.out/phase<N>``."""
    family = params.family
    impl = family.impl()
    model = impl.build(params.config.net)
    model.load_state_dict(weights[0])
    critic = None
    if weights[1] is not None and hasattr(impl, "build_critic"):
        critic = impl.build_critic(params.config.net)
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


def train_local(params: Params, phase: int, start: Start = NO_START, fresh: bool = False,
                sink: Sink | None = None) -> Path:
    """Train one phase in this process (resuming its checkpoints) and export the model."""
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
