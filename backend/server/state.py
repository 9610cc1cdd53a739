"""Server-wide state the RPCs share: liveness, draining, trace and log settings."""

from __future__ import annotations

import asyncio
import logging
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from pagedserve.repository import ModelRepository

SERVER_NAME = "pagedserve"
SERVER_VERSION = "0.1.0"
# What Triton's core reports, less what pagedserve does not implement (classification,
# sequence batching, shared memory).
EXTENSIONS = ["model_repository", "model_repository(unload_dependents)", "schedule_policy",
              "model_configuration", "binary_tensor_data", "parameters", "statistics",
              "trace", "logging"]


def _default_trace() -> dict[str, list[str]]:
    return {"trace_file": [], "trace_level": ["OFF"], "trace_rate": ["1000"],
            "trace_count": ["-1"], "log_frequency": ["0"], "trace_mode": ["triton"]}


def _set_event() -> asyncio.Event:
    event = asyncio.Event()
    event.set()
    return event


@dataclass
class ServerState:
    """Mutable server-wide settings; touched from the event loop only."""

    live: bool = True
    draining: bool = False
    trace: dict[str, list[str]] = field(default_factory=_default_trace)
    model_trace: dict[str, dict[str, list[str]]] = field(default_factory=dict)
    log: dict[str, bool | int | str] = field(default_factory=lambda: {
        "log_file": "", "log_info": True, "log_warning": True, "log_error": True,
        "log_verbose_level": 0, "log_format": "default"})
    # One queue per open gRPC stream, so draining can wake idle streams up to close them.
    streams: set[asyncio.Queue[object]] = field(default_factory=set)
    # The handler tasks of HTTP inference requests in flight: draining lets them finish, the
    # end of the grace period cancels them.
    http_requests: set[asyncio.Task[Any]] = field(default_factory=set)
    # Set while no stream and no HTTP request is open: draining waits on it before the servers
    # stop.
    no_streams: asyncio.Event = field(default_factory=_set_event)

    def open_stream(self, queue: asyncio.Queue[object]) -> None:
        self.streams.add(queue)
        self.no_streams.clear()

    def close_stream(self, queue: asyncio.Queue[object]) -> None:
        self.streams.discard(queue)
        self._check_idle()

    def open_http_request(self, task: asyncio.Task[Any]) -> None:
        self.http_requests.add(task)
        self.no_streams.clear()

    def close_http_request(self, task: asyncio.Task[Any]) -> None:
        self.http_requests.discard(task)
        self._check_idle()

    def _check_idle(self) -> None:
        if not self.streams and not self.http_requests:
            self.no_streams.set()

    def apply_log_levels(self) -> None:
        """Maps Triton's log switches onto Python logging levels."""
        if int(self.log["log_verbose_level"]) > 0:
            level = logging.DEBUG
        elif self.log["log_info"]:
            level = logging.INFO
        elif self.log["log_warning"]:
            level = logging.WARNING
        elif self.log["log_error"]:
            level = logging.ERROR
        else:
            level = logging.CRITICAL
        logging.getLogger().setLevel(level)


def server_live(state: ServerState, repository: ModelRepository) -> bool:
    """Liveness (``ServerLive``, ``/v2/health/live``, the gRPC health check of the server):
    false while a loaded model version's engine has died (a tensor-parallel rank gone), which
    only an unload or a reload mends, so that a liveness probe restarts the server."""
    return state.live and repository.is_live()
