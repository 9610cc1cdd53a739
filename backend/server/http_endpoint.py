"""The HTTP side: ``/v2/health/live``, ``/v2/health/ready`` and ``/metrics``.

A stdlib ``ThreadingHTTPServer`` on its own thread (aiohttp is not a dependency). It only reads
state that the event loop owns, through snapshots that are safe to take from another thread;
``/metrics`` renders the server's Prometheus registry (``pagedserve.server.metrics``).
Optional TLS (mutual too), Triton's ``--http-restricted-api`` on the health routes, and an idle
timeout on every connection.
"""

from __future__ import annotations

import contextlib
import json
import logging
import socket
import ssl
import threading
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

from prometheus_client import CollectorRegistry

from pagedserve.repository import ModelRepository
from pagedserve.server import metrics
from pagedserve.server.access import Restriction
from pagedserve.server.state import ServerState, server_live

log = logging.getLogger(__name__)

# Triton's HTTP api group of each route; /metrics has none (Triton's metrics port is open).
_GROUPS = {"/v2/health/live": "health", "/v2/health/ready": "health"}


@dataclass(frozen=True)
class HttpSettings:
    """What every HTTP port of the server shares (the metrics port included)."""

    tls: ssl.SSLContext | None = None
    idle_timeout: float = 30.0  # seconds a connection may stay silent, handshake included
    restrictions: Mapping[str, Restriction] = field(default_factory=dict)


def _handler(repository: ModelRepository, state: ServerState, settings: HttpSettings,
             registry: CollectorRegistry) -> type[BaseHTTPRequestHandler]:
    routes: dict[str, Callable[[], tuple[int, bytes, str]]] = {
        # 400 when not live or not ready, as Triton answers.
        "/v2/health/live": lambda: (200 if server_live(state, repository) else 400, b"",
                                    "text/plain"),
        "/v2/health/ready": lambda: (200 if server_live(state, repository) and not state.draining
                                     and repository.is_ready() else 400, b"", "text/plain"),
        "/metrics": lambda: (200, metrics.render(registry), metrics.CONTENT_TYPE_LATEST),
    }

    class Handler(BaseHTTPRequestHandler):
        # A silent client times out instead of holding its thread (StreamRequestHandler
        # applies it to the socket; handle_one_request then closes the connection).
        timeout = settings.idle_timeout

        def do_GET(self) -> None:
            path = self.path.split("?")[0]
            route = routes.get(path)
            restriction = settings.restrictions.get(_GROUPS.get(path, ""))
            if route is None:
                status, data, kind = 404, b'{"error":"Not Found"}', "application/json"
            elif restriction is not None and not restriction.allows(
                    self.headers.get(restriction.header)):
                # Triton's answer (HTTPAPIServer::RespondIfRestricted): 403 with an error JSON.
                status, data, kind = (
                    403, json.dumps({"error": restriction.http_message()}).encode(),
                    "application/json")
            else:
                status, data, kind = route()
            self.send_response(status)
            self.send_header("Content-Type", kind)
            self.send_header("Content-Length", str(len(data)))
            self.end_headers()
            self.wfile.write(data)

        def log_message(self, format: str, *args: object) -> None:  # quiet: no access log
            pass

    return Handler


class _Server(ThreadingHTTPServer):
    daemon_threads = True

    def __init__(self, address: tuple[str, int], handler: type[BaseHTTPRequestHandler],
                 settings: HttpSettings) -> None:
        self.settings = settings
        super().__init__(address, handler)

    def finish_request(self, request: Any, client_address: Any) -> None:
        # Runs on the connection's own thread, so a slow or silent TLS handshake holds that
        # thread (for at most the idle timeout), never the accept loop.
        request.settimeout(self.settings.idle_timeout)
        if self.settings.tls is None:
            super().finish_request(request, client_address)
            return
        try:
            connection = self.settings.tls.wrap_socket(request, server_side=True)
        except (ssl.SSLError, OSError) as e:
            # A plaintext client, a missing or untrusted client certificate, or silence.
            log.debug("TLS handshake with %s failed: %s", client_address, e)
            return
        try:
            super().finish_request(connection, client_address)
        finally:
            with contextlib.suppress(OSError):  # the peer may be gone already
                connection.shutdown(socket.SHUT_WR)
            connection.close()

    def handle_error(self, request: Any, client_address: Any) -> None:
        # Clients that vanish or time out mid-request are routine: no traceback on stderr.
        log.debug("HTTP connection from %s failed", client_address, exc_info=True)


class HttpEndpoint:
    """One listening HTTP(S) port serving health and ``registry``'s metrics."""

    def __init__(self, host: str, port: int, repository: ModelRepository,
                 state: ServerState, settings: HttpSettings | None,
                 registry: CollectorRegistry) -> None:
        settings = settings or HttpSettings()
        self.server = _Server((host, port), _handler(repository, state, settings, registry),
                              settings)
        self.port = self.server.server_address[1]
        self._thread = threading.Thread(target=self.server.serve_forever, name=f"http-{port}",
                                        daemon=True)

    def start(self) -> None:
        self._thread.start()

    def stop(self) -> None:
        self.server.shutdown()
        self.server.server_close()
