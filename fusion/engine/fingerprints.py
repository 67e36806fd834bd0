"""What a training result is a function of, as hashes: run names and the fingerprint.

A run's name is its phase plus a hash of everything that shapes its result: the family and
its sizes, the phase's loss weights, the training settings, the dataset manifest, the
training code (``fusion.engine.training_code``) and the weights it starts from (the
previous phase's export, or the warm start). A rerun of the same configuration resumes its
own checkpoints (e.g. after a crash); a different one never does. The fingerprint leaves
the starting weights out, so the retrain flow can tell an unchanged configuration.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
from pathlib import Path
from typing import Any

from fusion.data.prepared import manifest_digest
from fusion.engine.exports import weights_digest
from fusion.engine.start import NO_START, Start, phase_input
from fusion.engine.training_code import TRAINING_CODE
from fusion.files import sha256_tree
from fusion.params import Params

REPO = Path(__file__).resolve().parents[2]  # where TRAINING_CODE's paths start
RESULT_KEYS = ("batch_size", "crop", "lr", "d_lr", "lr_min_ratio", "grad_clip", "seed")


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
            "manifest": manifest_digest(params.train.data, params.ray.storage_endpoint),
            "code": code_digest()}


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
