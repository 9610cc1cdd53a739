"""Access control as Triton's ``--grpc-restricted-protocol`` / ``--http-restricted-api``.

``<group>[,<group>...]:<key>=<value>`` restricts the groups to requests that carry the header
``<key>`` (HTTP) or ``triton-grpc-protocol-<key>`` (gRPC) with exactly ``<value>``. Groups, the
RPCs in each, the parse errors and the refusal (gRPC UNAVAILABLE, HTTP 403) follow tritonserver
(src/grpc/grpc_server.cc, src/http_server.cc, src/command_line_parser.cc).
"""

from __future__ import annotations

import hmac
import re
from collections.abc import Awaitable, Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass
from types import MappingProxyType
from typing import Any

import grpc

GROUPS = ("health", "metadata", "inference", "shared-memory", "model-config",
          "model-repository", "statistics", "trace", "logging")

GRPC_HEADER_PREFIX = "triton-grpc-protocol-"

_INFERENCE = "/inference.GRPCInferenceService/"
_HEALTH = "/grpc.health.v1.Health/"
# Every RPC of the service, grouped as Triton's handlers register them. Reflection is not a
# Triton service and belongs to no group: it stays open.
GRPC_METHOD_GROUPS: Mapping[str, str] = MappingProxyType({
    _HEALTH + "Check": "health",
    _INFERENCE + "ServerLive": "health",
    _INFERENCE + "ServerReady": "health",
    _INFERENCE + "ModelReady": "health",
    _INFERENCE + "ServerMetadata": "metadata",
    _INFERENCE + "ModelMetadata": "metadata",
    _INFERENCE + "ModelInfer": "inference",
    _INFERENCE + "ModelStreamInfer": "inference",
    _INFERENCE + "ModelConfig": "model-config",
    _INFERENCE + "ModelStatistics": "statistics",
    _INFERENCE + "RepositoryIndex": "model-repository",
    _INFERENCE + "RepositoryModelLoad": "model-repository",
    _INFERENCE + "RepositoryModelUnload": "model-repository",
    _INFERENCE + "SystemSharedMemoryStatus": "shared-memory",
    _INFERENCE + "SystemSharedMemoryRegister": "shared-memory",
    _INFERENCE + "SystemSharedMemoryUnregister": "shared-memory",
    _INFERENCE + "CudaSharedMemoryStatus": "shared-memory",
    _INFERENCE + "CudaSharedMemoryRegister": "shared-memory",
    _INFERENCE + "CudaSharedMemoryUnregister": "shared-memory",
    _INFERENCE + "TraceSetting": "trace",
    _INFERENCE + "LogSettings": "logging",
})

# Header names are case-insensitive in HTTP and lower-case on the wire in HTTP/2 (gRPC
# clients refuse upper-case metadata keys), so keys are taken in lower case.
_KEY = re.compile(r"[a-z0-9][a-z0-9_.-]*")
_VALUE = re.compile(r"[\x21-\x7e]([\x20-\x7e]*[\x21-\x7e])?")  # printable, no edge spaces


@dataclass(frozen=True)
class Restriction:
    """The header a restricted group requires, and its value."""

    header: str
    value: str

    def allows(self, value: str | bytes | None) -> bool:
        if value is None:
            return False
        given = value if isinstance(value, bytes) else value.encode("utf-8", "surrogateescape")
        # Constant time, so the comparison leaks nothing about how much of a guess matched.
        return hmac.compare_digest(given, self.value.encode())

    def grpc_message(self) -> str:
        return f"This protocol is restricted, expecting header '{self.header}'"

    def http_message(self) -> str:
        return f"This API is restricted, expecting header '{self.header}'"


def parse_restrictions(specs: Iterable[str], option: str, header_prefix: str, kind: str
                       ) -> dict[str, Restriction]:
    """Group → restriction from repeated ``--<option>`` values; ``ValueError`` if malformed.

    ``kind`` is Triton's word in its messages: ``protocol`` (gRPC) or ``api`` (HTTP).
    """
    restrictions: dict[str, Restriction] = {}
    for spec in specs:
        groups, key, value = _split(spec, option)
        key = key.lower()
        if not _KEY.fullmatch(key) or (header_prefix and key.endswith("-bin")):
            raise ValueError(f"--{option}: restricted key '{key}' must be letters, digits, "
                             "'-', '_' or '.'" + (" and not end in '-bin'" if header_prefix
                                                  else ""))
        if not _VALUE.fullmatch(value):
            raise ValueError(f"--{option}: the value of restricted key '{key}' must be "
                             "printable ASCII without leading or trailing spaces")
        for group in groups.split(","):
            if group not in GROUPS:
                raise ValueError(f"unknown restricted {kind} '{group}' (known: "
                                 f"{', '.join(GROUPS)})")
            if group in restrictions:
                raise ValueError(f"restricted {kind} '{group}' can not be specified in "
                                 "multiple config groups")
            restrictions[group] = Restriction(header_prefix + key, value)
    return restrictions


def _split(spec: str, option: str) -> tuple[str, str, str]:
    # As Triton: the first ':' ends the groups, the first '=' after it ends the key.
    groups, colon, setting = spec.partition(":")
    key, equals, value = setting.partition("=")
    if not (colon and equals and groups and key and value):
        raise ValueError(f"--{option} option format is '<config name>:<setting>=<value>'. "
                         f"Got {spec}")
    return groups, key, value


def _first(metadata: Sequence[tuple[str, str | bytes]] | None, key: str) -> str | bytes | None:
    # Triton looks up the first value of the header, as a multimap find does.
    for name, value in metadata or ():
        if name == key:
            return value
    return None


_Continuation = Callable[[grpc.HandlerCallDetails], Awaitable[grpc.RpcMethodHandler | None]]


class RestrictedProtocols(grpc.aio.ServerInterceptor):
    """Refuses RPCs of restricted groups that lack the header, with Triton's status."""

    def __init__(self, restrictions: Mapping[str, Restriction]) -> None:
        self._by_method = {method: restrictions[group]
                           for method, group in GRPC_METHOD_GROUPS.items()
                           if group in restrictions}

    async def intercept_service(self, continuation: _Continuation,
                                details: grpc.HandlerCallDetails
                                ) -> grpc.RpcMethodHandler | None:
        handler = await continuation(details)
        restriction = self._by_method.get(details.method)
        if handler is None or restriction is None or restriction.allows(
                _first(details.invocation_metadata, restriction.header)):
            return handler
        return _refusal(handler, restriction.grpc_message())


def _refusal(handler: grpc.RpcMethodHandler, message: str) -> grpc.RpcMethodHandler:
    """A handler of the same streaming kind that aborts before reading any request."""

    async def refuse(request: Any, context: grpc.aio.ServicerContext) -> None:
        await context.abort(grpc.StatusCode.UNAVAILABLE, message)

    # No deserializer: a refused request is never parsed.
    if handler.request_streaming and handler.response_streaming:
        return grpc.stream_stream_rpc_method_handler(refuse)
    if handler.request_streaming:
        return grpc.stream_unary_rpc_method_handler(refuse)
    if handler.response_streaming:
        return grpc.unary_stream_rpc_method_handler(refuse)
    return grpc.unary_unary_rpc_method_handler(refuse)
