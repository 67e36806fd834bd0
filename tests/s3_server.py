"""A moto S3 server on loopback with a fault switch, for the tests and the S3 benchmark."""

from __future__ import annotations


class MotoS3:
    """A moto S3 server on loopback (real HTTP, so pyarrow, s3fs and DVC reach it) whose
    requests can be failed for a while, as a struggling store answers: HTTP 503 SlowDown.
    ``outage(key, seconds)`` arms it: the first request whose path holds ``key`` starts
    the outage (so it overlaps that write for certain); ``failed`` lists what was refused."""

    def __init__(self) -> None:
        import threading

        from moto.moto_server.werkzeug_app import (
            DomainDispatcherApplication,
            MotoRequestHandler,
            create_backend_app,
        )
        from werkzeug.serving import make_server

        self._app = DomainDispatcherApplication(create_backend_app)
        self._armed: tuple[str, float] | None = None
        self._until = 0.0
        self.failed: list[str] = []
        self._server = make_server("127.0.0.1", 0, self._serve, True,
                                   request_handler=MotoRequestHandler)
        self.url = f"http://127.0.0.1:{self._server.server_port}"
        self._thread = threading.Thread(target=self._server.serve_forever, daemon=True)
        self._thread.start()

    def outage(self, key: str, seconds: float) -> None:
        self._armed, self.failed = (key, seconds), []

    def _serve(self, environ: dict, start_response):
        import time

        request = f"{environ['REQUEST_METHOD']} {environ.get('PATH_INFO', '')}"
        if self._armed and self._armed[0] in request:
            self._until, self._armed = time.time() + self._armed[1], None
        if time.time() < self._until:
            self.failed.append(request)
            start_response("503 Slow Down", [("Content-Type", "application/xml")])
            return [b"<?xml version='1.0' encoding='UTF-8'?><Error><Code>SlowDown</Code>"
                    b"<Message>Please reduce your request rate.</Message></Error>"]
        return self._app(environ, start_response)

    def stop(self) -> None:
        self._server.shutdown()
        self._thread.join()
