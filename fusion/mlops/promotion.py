"""``fusion promote``: move the ``champion`` alias only when the measurements say so.

Challenger and champion are loaded from the registry and re-scored, with the mean and max
fusion baselines, on the same benchmark sets (``promote.sets`` of ``evaluate.sets``). The
gain of a metric is its relative change (``fusion.evaluation.gain``). The challenger is
promoted when

1. the floor holds: on every set, its weighted gain over the ``promote.floor`` baseline
   (the training-free two-scale rule by default) is positive, even when there is no
   champion yet: no version that loses to a rule anyone can compute without training is
   ever promoted;
2. against a champion, the weighted mean gain over all sets reaches
   ``promote.min_improvement`` and no weighted metric drops by more than
   ``promote.max_drop`` on any set.

The decision and the numbers are written as tags on the challenger version either way, and
appended to its model card (``fusion.mlops.model_card``), whose first description line
then states it.
Each decision records the champion it replaced, which ``--rollback`` restores. A
challenger older than the newest version the pipeline registered is not judged: that
registration did not finish (rerun ``fusion register``).

Aliases are single pointers, so each move is atomic; promotions from this machine are also
serialised by a file lock, and a promotion re-reads the aliases after taking it, so two
concurrent runs cannot both act on a stale champion.
"""

from __future__ import annotations

import fcntl
import hashlib
import json
import math
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from fusion.errors import FusionError
from fusion.evaluation.gain import relative_gain, weighted_gain
from fusion.mlops.connection import answering, connect
from fusion.mlops.model_card import refresh_card
from fusion.mlops.model_refs import CHALLENGER, CHAMPION
from fusion.mlops.register import REGISTRATION
from fusion.params import Params, PromoteParams


@dataclass
class Decision:
    promote: bool
    score: float  # weighted mean relative gain
    reason: str
    gains: dict[str, dict[str, float]]  # {set: {metric: relative gain}}


def floor(challenger: dict[str, dict[str, float]], baseline: dict[str, dict[str, float]],
          rule: PromoteParams) -> Decision | None:
    """A rejection when the challenger's weighted gain over the baseline is not positive
    on some set (None: the floor holds)."""
    scores = {name: weighted_gain(ours, baseline[name], rule.weights)
              for name, ours in challenger.items()}
    for name, score in scores.items():
        if not math.isfinite(score) or score <= 0:
            return Decision(False, score, f"below {rule.floor} fusion on {name}: weighted "
                            f"gain {score:+.2%} (floor: promote.floor={rule.floor})",
                            {"floor": scores})
    return None


def decide(challenger: dict[str, dict[str, float]], champion: dict[str, dict[str, float]],
           rule: PromoteParams) -> Decision:
    """Pure rule: compare per-set metric means of two models."""
    gains: dict[str, dict[str, float]] = {}
    total = weight_sum = 0.0
    worst = (0.0, "")
    for name, ours in challenger.items():
        theirs = champion[name]
        gains[name] = {}
        for w in rule.weights:
            gain = relative_gain(ours[w.metric], theirs[w.metric], w.metric)
            gains[name][w.metric] = gain
            if not math.isfinite(gain):  # e.g. a model that outputs NaN
                return Decision(False, math.nan, f"{w.metric} on {name} is not finite for "
                                "the challenger or the champion", gains)
            total += w.weight * gain
            weight_sum += w.weight
            if w.weight > 0 and gain < worst[0]:
                worst = (gain, f"{w.metric} on {name}")
    score = total / weight_sum if weight_sum else 0.0
    if -worst[0] > rule.max_drop:
        return Decision(False, score, f"{worst[1]} drops {-worst[0]:.1%} "
                        f"(guard: {rule.max_drop:.1%})", gains)
    if score < rule.min_improvement:
        return Decision(False, score, f"weighted gain {score:+.2%} below the required "
                        f"{rule.min_improvement:+.2%}", gains)
    return Decision(True, score, f"weighted gain {score:+.2%}, no metric drops more than "
                    f"{rule.max_drop:.1%}", gains)


@contextmanager
def _registry(params: Params) -> Iterator[tuple[Any, str]]:
    """(client, model name) while holding this machine's lock for that model's aliases;
    a tracking server that stops answering is a TransientError (exit 75)."""
    from mlflow import MlflowClient

    name = params.model_name
    uri = connect(params.mlflow)
    key = hashlib.sha256(f"{uri}|{name}".encode()).hexdigest()[:16]
    path = Path(tempfile.gettempdir()) / f"fusion-promote-{key}.lock"
    with path.open("w") as fh, answering(uri):
        fcntl.flock(fh, fcntl.LOCK_EX)
        try:
            yield MlflowClient(), name
        finally:
            fcntl.flock(fh, fcntl.LOCK_UN)


def _alias(client: Any, name: str, alias: str) -> str | None:
    from mlflow.exceptions import MlflowException

    try:
        return str(client.get_model_version_by_alias(name, alias).version)
    except MlflowException as exc:
        if "RESOURCE_DOES_NOT_EXIST" in str(exc.error_code) or "not found" in str(exc).lower():
            return None
        raise


def _scores(params: Params, versions: dict[str, str]) -> dict[str, dict[str, dict[str, float]]]:
    """{set: {label: {metric: mean}}} of registry versions ({label: version}) and the
    baselines, fused and scored on the promotion sets."""
    from fusion.evaluation.evaluate import Candidate, score_sets
    from fusion.inference.fuse import TileSpec, TorchEngine
    from fusion.mlops.model_refs import load_ref

    wanted = params.promote.sets
    sets = [s for s in params.evaluate.sets if not wanted or s.name in wanted]
    missing = sorted(set(wanted) - {s.name for s in sets})
    if missing or not sets:
        raise FusionError(f"promote.sets: {missing or wanted} not in evaluate.sets")
    candidates = []
    for label, version in versions.items():
        family, model = load_ref(params, f"models:/{params.model_name}/{version}")
        candidates.append(Candidate(label, TorchEngine(model, family,
                                                       TileSpec(params.evaluate.tile))))
    with tempfile.TemporaryDirectory() as tmp:
        return score_sets(candidates, sets, params, Path(tmp)).raw


def _newest_registered(client: Any, name: str) -> str | None:
    versions = [int(v.version) for v in client.search_model_versions(f"name = '{name}'")
                if REGISTRATION in v.tags]
    return str(max(versions)) if versions else None


def promote(params: Params) -> dict:
    """Decide on the current challenger; returns what was decided (also stored as tags)."""
    with _registry(params) as (client, name):
        challenger = _alias(client, name, CHALLENGER)
        if challenger is None:
            raise FusionError(f"model {name!r} has no {CHALLENGER!r} version to promote "
                              "(run the register stage first)")
        newest = _newest_registered(client, name)
        if newest is not None and int(newest) > int(challenger):
            raise FusionError(f"model {name!r}: the challenger is version {challenger}, but "
                              f"version {newest} is newer and has no alias (an interrupted "
                              "registration); rerun `fusion register` first")
        champion = _alias(client, name, CHAMPION)
        decision, numbers = _judge(params, challenger, champion)
        tags = {"promotion.decision": "promoted" if decision.promote else "rejected",
                "promotion.reason": decision.reason, "promotion.score": f"{decision.score:.6f}",
                "promotion.compared_to": champion or "none",
                "promotion.numbers": json.dumps(numbers, sort_keys=True)[:5000]}
        if decision.promote and champion != challenger:
            tags["promotion.previous_champion"] = champion or "none"
        for key, value in tags.items():
            client.set_model_version_tag(name, challenger, key, value)
        refresh_card(client, name, challenger)  # before the aliases: a rerun decides again
        if decision.promote:
            client.set_registered_model_alias(name, CHAMPION, challenger)
        client.delete_registered_model_alias(name, CHALLENGER)
    return {"model": name, "challenger": challenger, "champion_before": champion,
            "champion": challenger if decision.promote else champion,
            "promoted": decision.promote, "score": decision.score, "reason": decision.reason,
            "numbers": numbers}


def _judge(params: Params, challenger: str, champion: str | None) -> tuple[Decision, dict]:
    """The decision on a challenger, and the numbers it rests on."""
    rule = params.promote
    if champion == challenger:
        return Decision(True, 0.0, "already champion", {}), {}
    versions = {"challenger": challenger, **({"champion": champion} if champion else {})}
    if rule.floor == "none" and champion is None:
        return Decision(True, 0.0, "first version: no champion yet (no floor)", {}), {}
    scores = _scores(params, versions)
    ours = {name: methods["challenger"] for name, methods in scores.items()}
    numbers: dict[str, Any] = {"challenger": ours}
    if rule.floor != "none":
        numbers["baseline"] = {name: methods[rule.floor] for name, methods in scores.items()}
        rejected = floor(ours, numbers["baseline"], rule)
        if rejected is not None:
            return rejected, {**numbers, "floor": rejected.gains["floor"]}
    if champion is None:
        return Decision(True, 0.0, f"first version: no champion yet; above {rule.floor} "
                                   "fusion on every set", {}), numbers
    theirs = {name: methods["champion"] for name, methods in scores.items()}
    decision = decide(ours, theirs, rule)
    return decision, {**numbers, "champion": theirs, "gains": decision.gains}


def rollback(params: Params) -> dict:
    """Move ``champion`` back to the version it replaced."""
    with _registry(params) as (client, name):
        current = _alias(client, name, CHAMPION)
        if current is None:
            raise FusionError(f"model {name!r} has no champion to roll back")
        tags = client.get_model_version(name, current).tags
        previous = tags.get("promotion.previous_champion", "none")
        if previous == "none":
            raise FusionError(f"model {name!r}: champion version {current} replaced no "
                              "earlier champion; nothing to roll back to")
        client.set_model_version_tag(name, current, "promotion.rolled_back", "true")
        refresh_card(client, name, current)
        client.set_registered_model_alias(name, CHAMPION, previous)
    return {"model": name, "champion_before": current, "champion": previous}
