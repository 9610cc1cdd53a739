"""The HTTP side: ``/v2/health/live``, ``/v2/health/ready`` and ``/metrics``.

A stdlib ``ThreadingHTTPServer`` on its own thread (aiohttp is not a dependency). It only reads
state that the event loop owns, through snapshots that are safe to take from another thread.
"""

from __future__ import annotations

import threading
from collections.abc import Callable
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

from backend.repository import ModelRepository
from backend.server import metrics
from backend.server.state import ServerState


def _handler(repository: ModelRepository, state: ServerState
             ) -> type[BaseHTTPRequestHandler]:
    routes: dict[str, Callable[[], tuple[int, str, str]]] = {
        "/v2/health/live": lambda: (200 if state.live else 400, "", "text/plain"),
        "/v2/health/ready": lambda: (200 if state.live and not state.draining
                                     and repository.is_ready() else 400, "", "text/plain"),
        "/metrics": lambda: (200, metrics.render(repository),
                             "text/plain; version=0.0.4; charset=utf-8"),
    }

    class Handler(BaseHTTPRequestHandler):
        def do_GET(self) -> None:
            route = routes.get(self.path.split("?")[0])
            if route is None:
                status, body, kind = 404, '{"error":"Not Found"}', "application/json"
            else:
                status, body, kind = route()
            data = body.encode()
            self.send_response(status)
            self.send_header("Content-Type", kind)
            self.send_header("Content-Length", str(len(data)))
            self.end_headers()
            self.wfile.write(data)

        def log_message(self, format: str, *args: object) -> None:  # quiet: no access log
            pass

    return Handler


class HttpEndpoint:
    """One listening HTTP port serving health and metrics."""

    def __init__(self, host: str, port: int, repository: ModelRepository,
                 state: ServerState) -> None:
        self.server = ThreadingHTTPServer((host, port), _handler(repository, state))
        self.server.daemon_threads = True
        self.port = self.server.server_address[1]
        self._thread = threading.Thread(target=self.server.serve_forever, name=f"http-{port}",
                                        daemon=True)

    def start(self) -> None:
        self._thread.start()

    def stop(self) -> None:
        self.server.shutdown()
        self.server.server_close()
