"""The bundled starting checkpoint: a trained, evaluated export packed small into the family's
folder (``fusion bundle``), so that a fresh clone warm-starts from a model that already
clears the promotion floor. Written by the pipeline itself (the quality profile's
``dvc repro``, then ``fusion bundle``), never by hand."""

from __future__ import annotations

import dataclasses
import json
import shutil
from datetime import UTC, datetime
from pathlib import Path

import yaml

from fusion.data.prepared import MANIFEST
from fusion.engine.exports import CONFIG_FILE, MODEL_FILE, read_config
from fusion.errors import FusionError
from fusion.files import Output, replacing
from fusion.mlops.provenance import git_commit, sha_or_missing
from fusion.mlops.register import check_evaluated
from fusion.params import Params

PROVENANCE = "PROVENANCE.md"
BUNDLE = Output("fusion bundle", PROVENANCE, frozenset({MODEL_FILE, CONFIG_FILE, "params.yaml",
                                                       "metrics.json", PROVENANCE}))


def bundle(params: Params, out: Path | None = None) -> Path:
    """Copy ``evaluate.model`` (weights and config; no critic: a warm start trains fresh
    discriminators) with the params and the evaluation it was made with, and a provenance
    note, into ``out`` (default: the active family's bundled checkpoint folder)."""
    digest = check_evaluated(params)
    model = Path(params.evaluate.model)
    config = read_config(model)
    if config["family"] != params.model.family:
        raise FusionError(f"{model}: a {config['family']} model, but model.family is "
                          f"{params.model.family}")
    dest = out or params.family.pretrained_folder()
    if config.get("lineage"):
        raise FusionError(f"{model}: warm-started from {config['lineage']}; a bundled "
                          "checkpoint is trained from scratch (train.init: \"\")")
    summary = json.loads((Path(params.evaluate.out) / "summary.json").read_text())
    used = {"data": dataclasses.asdict(params.data),
            "model": {"family": params.model.family,
                      params.model.family: dataclasses.asdict(params.config)},
            "train": dataclasses.asdict(params.train)}
    with replacing(dest, BUNDLE) as tmp:
        for name in (MODEL_FILE, CONFIG_FILE):
            shutil.copy2(model / name, tmp / name)
        (tmp / "params.yaml").write_text(yaml.safe_dump(used, sort_keys=False))
        (tmp / "metrics.json").write_text(json.dumps(summary, indent=2) + "\n")
        (tmp / PROVENANCE).write_text(_provenance(params, config, digest))
    return dest


def _provenance(params: Params, config: dict, digest: str) -> str:
    sets = ", ".join(f"{s.name} ({s.a})" for s in params.evaluate.sets)
    return (f"# Bundled {params.model.family} checkpoint\n\n"
            f"- made: {datetime.now(UTC):%Y-%m-%d %H:%M UTC} by `fusion bundle` after "
            "`dvc repro` with the quality profile\n"
            f"- code: git commit {git_commit()}\n"
            f"- data: {', '.join(params.data.raw)}; excluded (never trained on): "
            f"{', '.join(params.data.exclude) or 'none'}\n"
            f"- prepared manifest sha256: {sha_or_missing(Path(params.data.out) / MANIFEST)}\n"
            f"- dvc.lock sha256: {sha_or_missing(Path('dvc.lock'))}\n"
            f"- training: steps {config.get('steps')} in the last phase, run "
            f"{config.get('run', '?')}, from scratch\n"
            + _teacher_line(params) +
            f"- weights sha256: {digest}\n"
            f"- evaluated on: {sets} (metrics.json)\n\n"
            "Rebuild: see README, \"Bundled starting checkpoint\".\n")


def _teacher_line(params: Params) -> str:
    """Which model phase 2 distilled from (``train.teacher``), and which weights exactly."""
    teacher = params.train.teacher
    if not params.distill_weight:
        return ""
    return (f"- distilled in phase 2 from: {teacher} (weights sha256 "
            f"{sha_or_missing(Path(teacher) / MODEL_FILE)})\n")
