"""``fusion promote``: move the ``champion`` alias only when the measurements say so.

Challenger and champion are loaded from the registry and re-scored on the same benchmark
sets (``promote.sets`` of ``evaluate.sets``). The gain of a metric is its relative change
(sign flipped for MSE, where lower is better); the challenger is promoted when the
weighted mean gain over all sets reaches ``promote.min_improvement`` and no weighted
metric drops by more than ``promote.max_drop`` on any set. The decision and the numbers
are written as tags on the challenger version either way; the first version becomes
champion. Each decision records the champion it replaced, which ``--rollback`` restores.

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

from mlflow import MlflowClient
from mlflow.exceptions import MlflowException

from fusion.errors import FusionError
from fusion.params import Params, PromoteParams
from fusion.tracking import CHALLENGER, CHAMPION, connect
from fusion.validation import LOWER_IS_BETTER


@dataclass
class Decision:
    promote: bool
    score: float  # weighted mean relative gain
    reason: str
    gains: dict[str, dict[str, float]]  # {set: {metric: relative gain}}


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
            base = theirs[w.metric]
            gain = (ours[w.metric] - base) / max(abs(base), 1e-12)
            if w.metric in LOWER_IS_BETTER:
                gain = -gain
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
def _registry(params: Params) -> Iterator[tuple[MlflowClient, str]]:
    """(client, model name) while holding this machine's lock for that model's aliases."""
    name = params.mlflow.model_name
    uri = connect(params.mlflow.tracking_uri)
    key = hashlib.sha256(f"{uri}|{name}".encode()).hexdigest()[:16]
    path = Path(tempfile.gettempdir()) / f"fusion-promote-{key}.lock"
    with path.open("w") as fh:
        fcntl.flock(fh, fcntl.LOCK_EX)
        try:
            yield MlflowClient(), name
        finally:
            fcntl.flock(fh, fcntl.LOCK_UN)


def _alias(client: MlflowClient, name: str, alias: str) -> str | None:
    try:
        return str(client.get_model_version_by_alias(name, alias).version)
    except MlflowException:
        return None


def _scores(params: Params, version: str) -> dict[str, dict[str, float]]:
    from fusion.evaluate import score_model
    from fusion.serving import load_fusion_model

    wanted = params.promote.sets
    sets = [s for s in params.evaluate.sets if not wanted or s.name in wanted]
    missing = sorted(set(wanted) - {s.name for s in sets})
    if missing or not sets:
        raise FusionError(f"promote.sets: {missing or wanted} not in evaluate.sets")
    model = load_fusion_model(f"models:/{params.mlflow.model_name}/{version}")
    with tempfile.TemporaryDirectory() as tmp:
        return score_model(model, sets, params, Path(tmp))


def promote(params: Params) -> dict:
    """Decide on the current challenger; returns what was decided (also stored as tags)."""
    with _registry(params) as (client, name):
        challenger = _alias(client, name, CHALLENGER)
        if challenger is None:
            raise FusionError(f"model {name!r} has no {CHALLENGER!r} version to promote "
                              "(run the register stage first)")
        champion = _alias(client, name, CHAMPION)
        if champion is None:
            decision = Decision(True, 0.0, "first version: no champion yet", {})
            numbers: dict = {}
        elif champion == challenger:
            decision = Decision(True, 0.0, "already champion", {})
            numbers = {}
        else:
            ours, theirs = _scores(params, challenger), _scores(params, champion)
            decision = decide(ours, theirs, params.promote)
            numbers = {"challenger": ours, "champion": theirs, "gains": decision.gains}
        tags = {"promotion.decision": "promoted" if decision.promote else "rejected",
                "promotion.reason": decision.reason, "promotion.score": f"{decision.score:.6f}",
                "promotion.compared_to": champion or "none",
                "promotion.numbers": json.dumps(numbers, sort_keys=True)[:5000]}
        if decision.promote and champion != challenger:
            tags["promotion.previous_champion"] = champion or "none"
        for key, value in tags.items():
            client.set_model_version_tag(name, challenger, key, value)
        if decision.promote:
            client.set_registered_model_alias(name, CHAMPION, challenger)
        client.delete_registered_model_alias(name, CHALLENGER)
    return {"model": name, "challenger": challenger, "champion_before": champion,
            "champion": challenger if decision.promote else champion,
            "promoted": decision.promote, "score": decision.score, "reason": decision.reason,
            "numbers": numbers}


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
        client.set_registered_model_alias(name, CHAMPION, previous)
    return {"model": name, "champion_before": current, "champion": previous}
