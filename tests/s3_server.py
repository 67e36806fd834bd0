"""A moto S3 server on loopback with fault switches, for the tests and the S3 benchmarks."""

from __future__ import annotations

import socket
import threading
import time


class MotoS3:
    """A moto S3 server on loopback (real HTTP, so pyarrow, s3fs and DVC reach it) that can
    misbehave as a real store does:

    - ``outage(key, seconds)``: a struggling store. The first request whose path holds
      ``key`` starts the outage (so it overlaps that write for certain); every request
      until it ends gets HTTP 503 SlowDown. ``failed`` lists what was refused.
    - ``down(seconds)``: a stopped store. The port refuses connections and every
      connection a client holds open is cut; then the server comes back on the same port
      with the same buckets (moto keeps them in this process).

    ``requests`` holds (time, "METHOD /path") of every request answered."""

    def __init__(self) -> None:
        from moto.moto_server.werkzeug_app import DomainDispatcherApplication, create_backend_app

        self._app = DomainDispatcherApplication(create_backend_app)
        self._armed: tuple[str, float] | None = None
        self._until = 0.0
        self._stopped = False
        self.failed: list[str] = []
        self.requests: list[tuple[float, str]] = []
        self._listen(0)
        self.url = f"http://127.0.0.1:{self._server.server_port}"

    def _listen(self, port: int) -> None:
        from moto.moto_server.werkzeug_app import MotoRequestHandler
        from werkzeug.serving import make_server

        self._server = make_server("127.0.0.1", port, self._serve, True,
                                   request_handler=MotoRequestHandler)
        self._thread = threading.Thread(target=self._server.serve_forever, daemon=True)
        self._thread.start()

    def outage(self, key: str, seconds: float) -> None:
        self._armed, self.failed = (key, seconds), []

    def down(self, seconds: float) -> None:
        """Stop the server for ``seconds`` (blocks), then start it again on its port."""
        port = self._server.server_port
        self._stopped, self.failed = True, []
        self.stop()
        time.sleep(seconds)
        self._stopped = False
        self._listen(port)

    def _serve(self, environ: dict, start_response):
        request = f"{environ['REQUEST_METHOD']} {environ.get('PATH_INFO', '')}"
        if self._stopped:  # a keep-alive connection opened before the stop: cut it
            self.failed.append(request)
            environ["werkzeug.socket"].shutdown(socket.SHUT_RDWR)
            start_response("503 Service Unavailable", [])
            return []
        if self._armed and self._armed[0] in request:
            self._until, self._armed = time.time() + self._armed[1], None
        if time.time() < self._until:
            self.failed.append(request)
            start_response("503 Slow Down", [("Content-Type", "application/xml")])
            return [b"<?xml version='1.0' encoding='UTF-8'?><Error><Code>SlowDown</Code>"
                    b"<Message>Please reduce your request rate.</Message></Error>"]
        self.requests.append((time.time(), request))
        return self._app(environ, start_response)

    def stop(self) -> None:
        self._server.shutdown()
        self._server.server_close()
        self._thread.join()
