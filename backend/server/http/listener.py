"""One listening HTTP(S) port: an aiohttp application served from the server's event loop.

aiohttp's own site classes cannot bound a TLS handshake, so the port is opened here with
``loop.create_server`` around the runner's protocol factory (aiohttp's documented low-level
server). What a slow or hostile client can hold is bounded:

* the TLS handshake and each request's header must complete within ``idle_timeout`` (aiohttp's
  keep-alive timer runs from the moment a connection opens and is not reset by partial data, so
  a client trickling one header byte at a time is closed as a silent one is);
* connections beyond ``max_connections`` are answered 503 and closed at once;
* the listen backlog is large enough that a burst of clients is queued by the kernel, not
  refused;
* bodies are capped at ``max_body_bytes`` (413) by the application (``client_max_size``).
"""

from __future__ import annotations

import asyncio
import json
import logging
import ssl
from collections.abc import Mapping
from dataclasses import dataclass, field

from aiohttp import web

from pagedserve.server.access import Restriction

log = logging.getLogger(__name__)

BACKLOG = 2048
DEFAULT_MAX_BODY_BYTES = 64 * 2**20  # Triton's --http-max-input-size default
DEFAULT_MAX_CONNECTIONS = 1024
STOP_WRITE_SECONDS = 2.0


@dataclass(frozen=True)
class HttpSettings:
    """What every HTTP port of the server shares (the metrics port included)."""

    tls: ssl.SSLContext | None = None
    # Seconds a connection may take to send a request's header (from its opening, or from the
    # previous response), TLS handshake included.
    idle_timeout: float = 30.0
    restrictions: Mapping[str, Restriction] = field(default_factory=dict)
    max_body_bytes: int = DEFAULT_MAX_BODY_BYTES
    max_connections: int = DEFAULT_MAX_CONNECTIONS
    api_key: str | None = None  # the OpenAI routes' bearer token, as vLLM's --api-key
    # /v1/load_lora_adapter and /v1/unload_lora_adapter are served (vLLM's
    # VLLM_ALLOW_RUNTIME_LORA_UPDATING); without it they are not found, as vLLM's.
    runtime_lora_updating: bool = False


_OVER_CAPACITY = json.dumps({"error": "too many connections; retry later"},
                            separators=(",", ":")).encode()


class _Refused(asyncio.Protocol):
    """A connection over the cap: one 503 answer, then closed."""

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        assert isinstance(transport, asyncio.Transport)
        transport.write(b"HTTP/1.1 503 Service Unavailable\r\nContent-Type: application/json\r\n"
                        b"Content-Length: " + str(len(_OVER_CAPACITY)).encode() +
                        b"\r\nConnection: close\r\n\r\n" + _OVER_CAPACITY)
        transport.close()


class _Site(web.BaseSite):
    """A TCP site whose TLS handshake is bounded and whose connections are capped."""

    def __init__(self, runner: web.BaseRunner, host: str, port: int,
                 settings: HttpSettings) -> None:
        super().__init__(runner, ssl_context=settings.tls, backlog=BACKLOG)
        self._host, self._port, self._settings = host, port, settings

    @property
    def name(self) -> str:
        scheme = "https" if self._settings.tls else "http"
        return f"{scheme}://{self._host}:{self._port}"

    async def start(self) -> None:
        await super().start()
        server = self._runner.server
        assert server is not None
        cap = self._settings.max_connections
        loop = asyncio.get_running_loop()
        # A burst of accepts makes all its protocols before any of them is connected (asyncio
        # runs each one's connection_made in a later callback), and aiohttp counts a
        # connection only from then: the protocols of the burst are counted here until their
        # turn comes, or a burst would pass the cap whole.
        unconnected = 0

        def connected() -> None:
            nonlocal unconnected
            unconnected -= 1

        def protocol() -> asyncio.BaseProtocol:
            nonlocal unconnected
            if len(server.connections) + unconnected >= cap:
                log.warning("HTTP connection refused: %d connections are open (the cap)", cap)
                return _Refused()
            unconnected += 1
            # Runs just before the transport's own call of connection_made, queued after it.
            loop.call_soon(connected)
            return server()

        self._server = await loop.create_server(
            protocol, self._host, self._port, ssl=self._settings.tls, backlog=BACKLOG,
            reuse_address=True,
            ssl_handshake_timeout=self._settings.idle_timeout if self._settings.tls else None)


class HttpListener:
    """Serves ``app`` on ``host:port`` (0: a free port, read back by ``port``)."""

    def __init__(self, app: web.Application, host: str, port: int,
                 settings: HttpSettings) -> None:
        # handler_cancellation: a client that disconnects cancels its handler, which aborts
        # its request in the engine at once.
        # By the time a listener stops, the server has let its requests finish or cut them
        # (the grace period); what is left gets a moment to write its end. Compressed bodies
        # are the routes' to inflate (Triton's /infer does, within the body limit).
        self._runner = web.AppRunner(app, handle_signals=False, access_log=None,
                                     handler_cancellation=True,
                                     keepalive_timeout=settings.idle_timeout,
                                     shutdown_timeout=STOP_WRITE_SECONDS,
                                     auto_decompress=False)
        self._host, self._requested_port, self._settings = host, port, settings
        self.port = port
        self._site: _Site | None = None

    async def start(self) -> None:
        await self._runner.setup()
        self._site = _Site(self._runner, self._host, self._requested_port, self._settings)
        await self._site.start()
        server = self._site._server
        assert isinstance(server, asyncio.Server)
        self.port = int(server.sockets[0].getsockname()[1])

    async def stop(self) -> None:
        """Stops listening, closes idle connections, gives handlers still running
        ``STOP_WRITE_SECONDS`` to finish, then cancels them."""
        await self._runner.cleanup()
