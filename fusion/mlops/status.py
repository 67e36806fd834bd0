"""``fusion status``: have data or params changed since the champion was trained? (The
retrain flow skips training when not.)"""

from __future__ import annotations

from typing import Any

from fusion.engine.fingerprints import fingerprint
from fusion.mlops.connection import answering, connect
from fusion.mlops.model_refs import CHAMPION
from fusion.mlops.register import FINGERPRINT
from fusion.params import Params


def champion_status(params: Params) -> dict[str, Any]:
    """Whether the current data and params are what the champion was trained from."""
    from mlflow import MlflowClient
    from mlflow.exceptions import MlflowException

    current = fingerprint(params)
    uri = connect(params.mlflow)
    name = params.model_name
    with answering(uri):
        try:
            version = MlflowClient().get_model_version_by_alias(name, CHAMPION)
        except MlflowException as exc:
            if "RESOURCE_DOES_NOT_EXIST" not in str(exc.error_code) and \
                    "not found" not in str(exc).lower():
                raise
            return {"model": name, "fingerprint": current, "champion": None,
                    "champion_fingerprint": None, "unchanged": False}
    theirs = version.tags.get(FINGERPRINT)
    return {"model": name, "fingerprint": current, "champion": str(version.version),
            "champion_fingerprint": theirs, "unchanged": theirs == current}
