"""Errors on the HTTP doors, worded and coded as Triton's HTTP server does.

Every failure is a compact ``{"error": "<message>"}`` body. The request mapping behind the doors
reports failures with gRPC status codes (the gRPC service's own); Triton maps its error codes
onto HTTP ones (``HttpCodeFromError``): internal 500, not found 404, unavailable 503,
unsupported 501, anything else 400. Overload (the engine's queue is full) is Triton's
``UNAVAILABLE`` too.
"""

from __future__ import annotations

import json
from typing import Any

import grpc
from aiohttp import web

_STATUS = {
    grpc.StatusCode.INTERNAL: 500,
    grpc.StatusCode.NOT_FOUND: 404,
    grpc.StatusCode.UNAVAILABLE: 503,
    grpc.StatusCode.RESOURCE_EXHAUSTED: 503,
    grpc.StatusCode.UNIMPLEMENTED: 501,
}


def http_status(code: grpc.StatusCode) -> int:
    return _STATUS.get(code, 400)


def compact(value: Any) -> bytes:
    """JSON as Triton writes it: no spaces."""
    return json.dumps(value, separators=(",", ":"), ensure_ascii=False).encode()


def json_response(value: Any, status: int = 200) -> web.Response:
    return web.Response(body=compact(value), status=status, content_type="application/json")


def error_response(status: int, message: str) -> web.Response:
    return json_response({"error": message}, status)


class HttpError(Exception):
    """A request refused with ``status`` and Triton's ``{"error": message}`` body."""

    def __init__(self, status: int, message: str) -> None:
        super().__init__(message)
        self.status = status
        self.message = message

    @classmethod
    def from_grpc(cls, code: grpc.StatusCode, message: str) -> HttpError:
        return cls(http_status(code), message)

    def response(self) -> web.Response:
        return error_response(self.status, self.message)
