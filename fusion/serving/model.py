"""The registered version a replica serves, and how it follows the alias.

A replica loads ``models:/<model>@<alias>`` through the registry loader ``fusion fuse``
uses (the version's ONNX export and config from its artifacts: never pickled code) into an
onnxruntime engine, then checks the alias every ``serve.poll_s``. When the alias has moved
(a promotion, a rollback) it loads the new version beside the old one and swaps the
reference: a request holds the engine it started with, so none fails during the swap. A
registry that stops answering leaves the loaded version serving; health says so.
"""

from __future__ import annotations

import threading
import time
from dataclasses import dataclass
from typing import Any

from fusion.errors import FusionError
from fusion.params import Params


@dataclass(frozen=True)
class Loaded:
    """One registered version, ready to fuse."""

    name: str
    version: str
    source: str  # models:/<name>/<version>
    engine: Any  # fusion.inference.onnx.OnnxEngine


def load_version(params: Params, source: str) -> Loaded:
    """A registered version (``models:/<name>/<version>``) as an onnxruntime engine, from
    its ONNX artifact; the family comes from the version's config.json."""
    from fusion.engine.exports import read_config
    from fusion.inference.onnx import OnnxEngine
    from fusion.mlops.model_refs import fetch
    from fusion.mlops.pyfunc import ONNX, WEIGHTS, artifact

    root, source = fetch(params, source)
    read_config(artifact(root, WEIGHTS))
    engine = OnnxEngine.open(artifact(root, ONNX),
                             threads=max(1, int(params.serve.cpus_per_replica)))
    name, _, version = source.removeprefix("models:/").rpartition("/")
    return Loaded(name, version, source, engine)


class Follower:
    """The version a replica serves now, kept in step with the alias (see the module)."""

    def __init__(self, params: Params) -> None:
        from fusion.mlops.model_refs import alias_uri, version_of

        self.params = params
        self.uri = alias_uri(params, f"@{params.serve.alias}")
        self.current = load_version(params, version_of(params, self.uri))
        self.problem = ""  # why the alias could not be followed last time ("": it could)
        self.checked = time.time()
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._follow, name="follow-alias", daemon=True)
        self._thread.start()

    def _follow(self) -> None:
        from fusion.mlops.model_refs import version_of

        while not self._stop.wait(self.params.serve.poll_s):
            try:
                source = version_of(self.params, self.uri)
                if source != self.current.source:
                    self.current = load_version(self.params, source)  # then swap
                self.problem = ""
            except (FusionError, OSError) as exc:
                self.problem = str(exc).splitlines()[0][:300]
            except Exception as exc:  # noqa: BLE001  (the loaded version keeps serving)
                self.problem = f"{type(exc).__name__}: {str(exc).splitlines()[0][:300]}"
            self.checked = time.time()

    def health(self) -> dict[str, Any]:
        """What /healthz answers: the served version and whether the alias is followed."""
        loaded = self.current
        status = {"status": "degraded" if self.problem else "ok", "model": loaded.name,
                  "version": loaded.version, "alias": self.params.serve.alias,
                  "uri": self.uri, "checked_s_ago": round(time.time() - self.checked, 1)}
        if self.problem:
            status["detail"] = (f"cannot follow {self.uri} ({self.problem}); still serving "
                                f"{loaded.source}")
        return status

    def stop(self) -> None:
        self._stop.set()
