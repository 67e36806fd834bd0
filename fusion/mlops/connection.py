"""The MLflow tracking server or store every command talks to, with bounded waits.

The tracking URI is resolved one way for every command: ``mlflow.tracking_uri``
(params.yaml or ``--set``), else ``$MLFLOW_TRACKING_URI``, else ``sqlite:///mlflow.db``.
Requests to a server time out and are retried a bounded number of times
(``mlflow.timeout_s``, ``mlflow.retries``); a server that does not answer is a
``TransientError`` (exit 75) naming its URI.
"""

from __future__ import annotations

import os
import urllib.error
import urllib.request
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

from fusion.errors import TransientError
from fusion.params import MlflowParams
from fusion.progress import enabled as progress_enabled

DEFAULT_URI = "sqlite:///mlflow.db"


def tracking_uri(configured: str) -> str:
    """``--set``/params.yaml, else ``$MLFLOW_TRACKING_URI``, else the SQLite default; a
    relative SQLite path is made absolute (Ray workers log from other folders)."""
    uri = configured or os.environ.get("MLFLOW_TRACKING_URI", "") or DEFAULT_URI
    if uri.startswith("sqlite:///") and not uri.startswith("sqlite:////"):
        uri = f"sqlite:///{Path(uri.removeprefix('sqlite:///')).resolve()}"
    return uri


def connect(ml: MlflowParams) -> str:
    """Point MLflow at the configured store with bounded request waits; a server that does
    not answer is a TransientError naming its URI (MLflow alone would retry for minutes)."""
    uri = tracking_uri(ml.tracking_uri)
    os.environ.setdefault("MLFLOW_HTTP_REQUEST_TIMEOUT", str(int(ml.timeout_s)))
    os.environ.setdefault("MLFLOW_HTTP_REQUEST_MAX_RETRIES", str(ml.retries))
    os.environ.setdefault("MLFLOW_HTTP_REQUEST_BACKOFF_FACTOR", "1")
    if not progress_enabled():  # MLflow's download bars only where ours show (a terminal)
        os.environ.setdefault("MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR", "false")
    if uri.startswith(("http://", "https://")):
        try:
            with urllib.request.urlopen(f"{uri.rstrip('/')}/health",
                                        timeout=ml.timeout_s) as reply:
                reply.read()
        except (urllib.error.URLError, OSError) as exc:
            raise TransientError(f"MLflow tracking server {uri} is unreachable: {exc}") from exc
    import mlflow

    # MLflow also exports the URI as $MLFLOW_TRACKING_URI for child processes; that variable
    # is the user's setting (it ranks after params.yaml), so it is put back as it was
    before = os.environ.get("MLFLOW_TRACKING_URI")
    mlflow.set_tracking_uri(uri)
    mlflow.set_registry_uri(uri)
    if before is None:
        os.environ.pop("MLFLOW_TRACKING_URI", None)
    else:
        os.environ["MLFLOW_TRACKING_URI"] = before
    return uri


@contextmanager
def answering(uri: str) -> Iterator[None]:
    """Turn a tracking server that stops answering mid-command into a TransientError."""
    import requests
    from mlflow.exceptions import MlflowException

    try:
        yield
    except requests.exceptions.RequestException as exc:
        raise TransientError(f"MLflow tracking server {uri} stopped answering: "
                             f"{type(exc).__name__}") from exc
    except MlflowException as exc:
        text = str(exc)
        if any(s in text for s in ("Max retries exceeded", "Connection", "timed out",
                                   "API request to", "status code 5")):
            raise TransientError(f"MLflow tracking server {uri} stopped answering: "
                                 f"{text.splitlines()[0][:200]}") from exc
        raise
