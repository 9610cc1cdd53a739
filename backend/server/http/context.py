"""What every HTTP route reaches: the repository, the server's state and the gRPC service.

The KServe routes call the gRPC service's own RPC methods, so both protocols share one request
mapping, one set of checks and one wording; ``ServiceCall`` stands in for the gRPC context
those methods take.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import NoReturn

import grpc
from prometheus_client import CollectorRegistry

from pagedserve.repository import ModelRepository, ModelVersion, RepositoryError
from pagedserve.server.http.errors import HttpError
from pagedserve.server.http.listener import HttpSettings
from pagedserve.server.service import InferenceService
from pagedserve.server.state import ServerState

TRACE_HEADERS = ("traceparent", "tracestate")


@dataclass(frozen=True)
class HttpContext:
    repository: ModelRepository
    state: ServerState
    service: InferenceService
    registry: CollectorRegistry
    settings: HttpSettings


def model_version(context: HttpContext, name: str, version: str) -> ModelVersion:
    """The model version a route names, or the lookup's error with Triton's status."""
    try:
        return context.repository.get(name, version)
    except RepositoryError as e:
        raise HttpError.from_grpc(e.code, e.message) from None


def trace_headers(headers: Mapping[str, str]) -> dict[str, str] | None:
    """The W3C trace context an HTTP request carries, as the gRPC metadata's."""
    found = {key: headers[key] for key in TRACE_HEADERS if key in headers}
    return found or None


class ServiceCall:
    """A gRPC servicer context for an RPC method called on behalf of an HTTP request: its
    trace headers as metadata, and an abort that raises ``HttpError`` with Triton's status."""

    def __init__(self, headers: Mapping[str, str] | None = None) -> None:
        self._metadata = tuple((trace_headers(headers or {}) or {}).items())

    def invocation_metadata(self) -> tuple[tuple[str, str], ...]:
        return self._metadata

    async def abort(self, code: grpc.StatusCode, message: str) -> NoReturn:
        raise HttpError.from_grpc(code, message)
