"""``fusion serve``: a Ray Serve application that fuses pairs with a family's champion.

HTTP API (one deployment, ``serve.replicas`` replicas of ``serve.cpus_per_replica`` CPUs;
each runs the version's ONNX export in onnxruntime, ``fusion.serving.model``):

- ``POST /fuse``: a multipart form with two files, ``a`` and ``b`` (PNG or TIFF, 8 or 16
  bit, grey or colour, one size). The answer is the fused image in A's format (16-bit when
  a source is, colour when a source is), with the served version in ``X-Fusion-Model`` and
  ``X-Fusion-Version``.
- ``GET /healthz``: the served model, version and alias; ``degraded`` (naming the URI)
  while the registry does not answer, the loaded version still serving.
- ``GET /metrics``: request counts and latencies in Prometheus' text format, of all
  replicas (a small stats deployment collects them).

Bad input is one line of JSON and a 4xx, never a dead replica: no Content-Length 411, a
request over ``serve.max_request_mb`` 413 (before its body is read), an image over
``data.max_pixels`` 413 (from its header, before it is decoded), a missing, empty,
undecodable or mismatched image 400.

KubeRay's RayService imports ``fusion.serving.app:build`` (``infra/k8s/rayservice.yaml``).
"""

from __future__ import annotations

import asyncio
import json
import time
from typing import Any

from fusion.errors import BadInputError, FusionError
from fusion.params import Params, load_params

APP = "fusion"  # the Serve application's name
LATENCY_BUCKETS = (0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0)


class HTTPError(Exception):
    """A request the service refuses, with its status code and one line saying why."""

    def __init__(self, status: int, message: str) -> None:
        super().__init__(message)
        self.status, self.message = status, message


class ServeStats:
    """The stats deployment: request counts and latencies of every replica, in Prometheus'
    text format (each replica records into it after every request)."""

    def __init__(self) -> None:
        from prometheus_client import CollectorRegistry, Counter, Histogram, disable_created_metrics

        disable_created_metrics()  # counts and latencies, without a _created series each
        self.registry = CollectorRegistry()
        self.requests = Counter("fusion_requests", "Requests answered, by endpoint and status",
                                ["endpoint", "code"], registry=self.registry)
        self.latency = Histogram("fusion_request_seconds", "Seconds to answer a request",
                                 ["endpoint"], buckets=LATENCY_BUCKETS, registry=self.registry)
        self.fused = Counter("fusion_pairs_fused", "Pairs fused, by model version",
                             ["model", "version"], registry=self.registry)

    def record(self, endpoint: str, code: int, seconds: float, model: str = "",
               version: str = "") -> None:
        self.requests.labels(endpoint, str(code)).inc()
        self.latency.labels(endpoint).observe(seconds)
        if endpoint == "/fuse" and code == 200:
            self.fused.labels(model, version).inc()

    def render(self) -> str:
        from prometheus_client import generate_latest

        return generate_latest(self.registry).decode()


class FusionService:
    """The fusing deployment (the module docstring has the API)."""

    def __init__(self, params: Params, stats: Any = None) -> None:
        from fusion.serving.model import Follower

        self.params, self.stats = params, stats
        self.follower = Follower(params)

    async def __call__(self, request: Any) -> Any:
        from starlette.responses import JSONResponse, PlainTextResponse

        started = time.perf_counter()
        path = request.url.path.rstrip("/") or "/"
        served = self.follower.current
        try:
            if request.method == "POST" and path == "/fuse":
                response, served = await self._fuse(request)
            elif request.method == "GET" and path == "/healthz":
                response = JSONResponse(self.follower.health())
            elif request.method == "GET" and path == "/metrics":
                text = await self.stats.render.remote() if self.stats else ""
                response = PlainTextResponse(text, media_type="text/plain; version=0.0.4")
            else:
                raise HTTPError(404, f"no {request.method} {path}: POST /fuse, GET /healthz, "
                                     "GET /metrics")
        except HTTPError as exc:
            response = JSONResponse({"error": exc.message}, status_code=exc.status)
        except Exception as exc:  # noqa: BLE001  (one request never takes a replica down)
            response = JSONResponse({"error": f"{type(exc).__name__}: "
                                              f"{str(exc).splitlines()[0][:300]}"},
                                    status_code=500)
        if self.stats is not None:  # fire and forget: the answer does not wait for it
            self.stats.record.remote(path, response.status_code, time.perf_counter() - started,
                                     served.name, served.version)
        return response

    async def _fuse(self, request: Any) -> tuple[Any, Any]:
        from starlette.responses import Response

        from fusion.data.images import (
            TooLargeError,
            Upload,
            encode_image,
            probe_image,
            read_image,
        )
        from fusion.inference.fuse import fuse_images, plan

        limit = self.params.serve.max_request_mb
        length = request.headers.get("content-length")
        if length is None or not length.isdigit():
            raise HTTPError(411, "send a Content-Length header")
        if int(length) > limit * 2**20:
            raise HTTPError(413, f"request of {int(length) / 2**20:.1f} MB, over the limit of "
                                 f"{limit:g} MB (serve.max_request_mb)")
        try:
            form = await request.form(max_files=2, max_fields=2)
        except Exception as exc:  # noqa: BLE001  (Starlette's multipart errors vary)
            raise HTTPError(400, f"not a multipart form with files a and b ({exc})") from exc
        uploads = []
        for part in ("a", "b"):
            file = form.get(part)
            if file is None or isinstance(file, str):
                raise HTTPError(400, f"part {part!r} missing: send two files, a and b")
            uploads.append(Upload(f"{part} ({file.filename or 'unnamed'})", await file.read()))
        max_pixels = self.params.data.max_pixels
        try:
            spec = plan(*(probe_image(u, max_pixels) for u in uploads))
            images = [read_image(u, max_pixels) for u in uploads]
        except TooLargeError as exc:
            raise HTTPError(413, str(exc)) from exc
        except BadInputError as exc:
            raise HTTPError(400, str(exc)) from exc
        served = self.follower.current  # held to the end: a swap cannot pull it away
        fused = await asyncio.to_thread(fuse_images, served.engine, *images)
        suffix = uploads[0].suffix()
        body = encode_image(fused.pixels, suffix)
        media = "image/png" if suffix == ".png" else "image/tiff"
        headers = {"X-Fusion-Model": served.name, "X-Fusion-Version": served.version,
                   "X-Fusion-Size": f"{spec.width}x{spec.height}"}
        return Response(body, media_type=media, headers=headers), served

    def __del__(self) -> None:
        follower = getattr(self, "follower", None)
        if follower is not None:
            follower.stop()


def application(params: Params) -> Any:
    """The Serve application: the fusing deployment and its stats deployment."""
    from ray import serve

    s = params.serve
    stats = serve.deployment(ServeStats, name="stats", num_replicas=1,
                             ray_actor_options={"num_cpus": 0})
    service = serve.deployment(FusionService, name="fusion", num_replicas=s.replicas,
                               ray_actor_options={"num_cpus": s.cpus_per_replica},
                               max_ongoing_requests=s.max_ongoing)
    return service.bind(params, stats.bind())


def build(args: dict[str, Any]) -> Any:
    """Serve's application builder, for ``serve run`` and KubeRay's RayService
    (``import_path: fusion.serving.app:build``); ``args``: ``params`` (a params file, default
    params.yaml) and ``set`` (``section.key=value`` overrides)."""
    import fusion.models  # noqa: F401  (registers the families: params types their sections)

    overrides = args.get("set") or []
    if isinstance(overrides, str):
        overrides = json.loads(overrides) if overrides.startswith("[") else [overrides]
    return application(served_params(load_params(args.get("params") or None, overrides)))


def served_params(params: Params) -> Params:
    """Params for replicas, which may run on other nodes: the tracking URI resolved here
    (a relative SQLite path made absolute, ``$MLFLOW_TRACKING_URI`` written in), and the
    served alias checked to exist, so a missing champion is one line here, not a failed
    deployment."""
    from dataclasses import replace

    from fusion.mlops.connection import tracking_uri
    from fusion.mlops.model_refs import alias_uri, version_of

    params = replace(params, mlflow=replace(params.mlflow,
                                            tracking_uri=tracking_uri(params.mlflow.tracking_uri)))
    version_of(params, alias_uri(params, f"@{params.serve.alias}"))
    return params


def run(params: Params, address: str = "") -> str:
    """Deploy the application on ``address`` (else ``ray.address``, ``$RAY_ADDRESS``, or a
    local instance); returns the endpoint's URL. The deployment keeps running after this
    process exits when it joined a cluster."""
    from fusion.engine.cluster import connect

    params = served_params(params)
    connect(address or params.ray.address)
    from ray import serve

    s = params.serve
    try:
        serve.start(http_options={"host": s.host, "port": s.port},
                    proxy_location=s.proxy_location)
        serve.run(application(params), name=APP, route_prefix="/", blocking=False)
    except RuntimeError as exc:  # a deployment that failed on its replicas
        raise FusionError(f"fusion serve: the application did not start: "
                          f"{str(exc).splitlines()[0][:300]}") from exc
    return f"http://{s.host}:{s.port}"
