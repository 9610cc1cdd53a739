"""An in-test OTLP trace receiver: what an OpenTelemetry Collector would receive, in memory.

No Collector binary is available to the tests, so :class:`OtlpReceiver` stands in for one. It
listens on loopback, on free ports, with both transports of OTLP traces:

* OTLP/gRPC: ``opentelemetry.proto.collector.trace.v1.TraceService/Export`` (gRPC-level
  compression such as gzip is undone by gRPC itself);
* OTLP/HTTP: ``POST /v1/traces`` with ``Content-Type: application/x-protobuf``, the body
  optionally ``Content-Encoding: gzip`` or ``deflate``. OTLP/JSON is refused with 415.

Neither exporter compresses by default. ``OTEL_EXPORTER_OTLP_[TRACES_]COMPRESSION`` takes
``none``, ``gzip`` or ``deflate`` for the HTTP exporter (sent as ``Content-Encoding``), but only
``gzip`` for the gRPC one, which raises ``InvalidCompressionValueException`` when constructed
with any other value, ``none`` included: leave the variable unset rather than set to ``none``.

Every span received is flattened into a :class:`ReceivedSpan`; ``spans()`` returns them and
``wait_for(predicate, timeout)`` blocks until they satisfy a predicate::

    with OtlpReceiver() as rx:
        ...  # start the process under test, pointed at rx (below)
        spans = rx.wait_for(lambda s: any(x.name == "request" for x in s), timeout=5)

Pointing a process at the receiver through environment variables (verified against the installed
exporters, opentelemetry-exporter-otlp-proto-{grpc,http} 1.45):

* gRPC: ``OTEL_EXPORTER_OTLP_TRACES_PROTOCOL=grpc`` and
  ``OTEL_EXPORTER_OTLP_ENDPOINT=<rx.grpc_endpoint>`` (``http://127.0.0.1:PORT``). The ``http://``
  scheme is what makes the gRPC exporter use a plaintext channel; ``127.0.0.1:PORT`` alone would
  make it try TLS (or set ``OTEL_EXPORTER_OTLP_INSECURE=true``).
  ``OTEL_EXPORTER_OTLP_TRACES_ENDPOINT`` takes the same value: gRPC has no path.
* HTTP: ``OTEL_EXPORTER_OTLP_TRACES_PROTOCOL=http/protobuf`` and
  ``OTEL_EXPORTER_OTLP_ENDPOINT=<rx.http_endpoint>`` (``http://127.0.0.1:PORT``): the exporter
  appends ``/v1/traces`` to this base. ``OTEL_EXPORTER_OTLP_TRACES_ENDPOINT`` (and the exporter's
  ``endpoint=`` argument) is used verbatim, so it must be the full
  ``<rx.http_traces_endpoint>`` (``http://127.0.0.1:PORT/v1/traces``); given the bare base, the
  exporter posts to ``/`` and gets 404.

The exporter classes themselves never read ``OTEL_EXPORTER_OTLP_[TRACES_]PROTOCOL``: only the
SDK's auto-configuration (``opentelemetry-instrument``, ``OTEL_TRACES_EXPORTER=otlp``) does, to
pick the class. Code that builds its exporter by hand must choose the gRPC or HTTP class itself.
``OTEL_SERVICE_NAME`` reaches the ``service.name`` resource attribute through
``Resource.create()``. If a proxy is configured, include ``127.0.0.1`` in ``NO_PROXY``: both the
``requests``-based HTTP exporter and gRPC honour the proxy variables.
"""

from __future__ import annotations

import gzip
import threading
import time
import zlib
from collections.abc import Callable, Iterable, Mapping
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from http import HTTPStatus
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from types import TracebackType
from typing import Any, Literal

import grpc
from google.protobuf.message import DecodeError
from opentelemetry.proto.collector.trace.v1.trace_service_pb2 import (
    ExportTraceServiceRequest,
    ExportTraceServiceResponse,
)
from opentelemetry.proto.collector.trace.v1.trace_service_pb2_grpc import (
    TraceServiceServicer,
    add_TraceServiceServicer_to_server,
)
from opentelemetry.proto.common.v1.common_pb2 import AnyValue, KeyValue
from opentelemetry.proto.trace.v1.trace_pb2 import Span, Status

Transport = Literal["grpc", "http"]

HTTP_TRACES_PATH = "/v1/traces"
# The HTTP exporter refuses requests over 64 MiB by default; accept as much over both transports
# (gRPC's own default receive limit is only 4 MiB).
MAX_REQUEST_BYTES = 64 * 1024 * 1024


@dataclass(frozen=True)
class ReceivedEvent:
    name: str
    time_ns: int
    attributes: dict[str, Any]


@dataclass(frozen=True)
class ReceivedLink:
    trace_id: str
    span_id: str
    attributes: dict[str, Any]


@dataclass(frozen=True)
class ReceivedSpan:
    """One received span. Ids are lower-case hex (32 digits for a trace, 16 for a span);
    ``parent_span_id`` is '' for a root. ``kind`` is the OTLP kind without its prefix
    (``"INTERNAL"``, ``"SERVER"``, ..., the names of the SDK's ``SpanKind``; ``"UNSPECIFIED"`` when
    unset), ``status_code`` likewise (``"UNSET"``, ``"OK"``, ``"ERROR"``, as ``StatusCode``).
    Attribute values decode as the SDK holds them: arrays as tuples, key-value lists as dicts,
    bytes as bytes, an empty value as None. ``scope`` is the instrumentation scope's name."""

    name: str
    trace_id: str
    span_id: str
    parent_span_id: str
    kind: str
    start_ns: int
    end_ns: int
    attributes: dict[str, Any]
    events: list[ReceivedEvent]
    links: list[ReceivedLink]
    resource: dict[str, Any]
    scope: str
    transport: Transport
    scope_version: str = ""
    status_code: str = "UNSET"
    status_message: str = ""
    trace_state: str = ""


@dataclass(frozen=True)
class ReceivedExport:
    """One accepted export request: its transport, how many spans it carried, and its headers
    (gRPC metadata or HTTP headers, names lower-cased), e.g. ``content-encoding`` or headers set
    through ``OTEL_EXPORTER_OTLP_HEADERS``."""

    transport: Transport
    span_count: int
    headers: dict[str, str] = field(default_factory=dict)


def decode_any_value(value: AnyValue) -> Any:
    """An OTLP ``AnyValue`` as the Python value the SDK would hold for it."""
    kind = value.WhichOneof("value")
    if kind is None:
        return None
    if kind == "array_value":
        # Tuples, since the SDK stores every sequence attribute as a tuple: received values
        # then compare equal to ``dict(readable_span.attributes)``.
        return tuple(decode_any_value(v) for v in value.array_value.values)
    if kind == "kvlist_value":
        return decode_attributes(value.kvlist_value.values)
    if kind in ("string_value", "bool_value", "int_value", "double_value", "bytes_value"):
        return getattr(value, kind)
    # string_value_strindex only appears in profiles' dictionary-encoded data, never in traces.
    raise ValueError(f"unsupported AnyValue kind {kind!r}")


def decode_attributes(attributes: Iterable[KeyValue]) -> dict[str, Any]:
    return {kv.key: decode_any_value(kv.value) for kv in attributes}


def _prefixless(enum_name: str, prefix: str) -> str:
    return enum_name.removeprefix(prefix)


def flatten_request(request: ExportTraceServiceRequest,
                    transport: Transport) -> list[ReceivedSpan]:
    """Every span of an export request, with its resource and scope folded in."""
    spans: list[ReceivedSpan] = []
    for resource_spans in request.resource_spans:
        resource = decode_attributes(resource_spans.resource.attributes)
        for scope_spans in resource_spans.scope_spans:
            for span in scope_spans.spans:
                spans.append(ReceivedSpan(
                    name=span.name,
                    trace_id=span.trace_id.hex(),
                    span_id=span.span_id.hex(),
                    parent_span_id=span.parent_span_id.hex(),
                    kind=_prefixless(Span.SpanKind.Name(span.kind), "SPAN_KIND_"),
                    start_ns=span.start_time_unix_nano,
                    end_ns=span.end_time_unix_nano,
                    attributes=decode_attributes(span.attributes),
                    events=[ReceivedEvent(e.name, e.time_unix_nano, decode_attributes(e.attributes))
                            for e in span.events],
                    links=[ReceivedLink(link.trace_id.hex(), link.span_id.hex(),
                                        decode_attributes(link.attributes))
                           for link in span.links],
                    # Each span gets its own copy, so that a test mutating one sees no others.
                    resource=dict(resource),
                    scope=scope_spans.scope.name,
                    transport=transport,
                    scope_version=scope_spans.scope.version,
                    status_code=_prefixless(Status.StatusCode.Name(span.status.code),
                                            "STATUS_CODE_"),
                    status_message=span.status.message,
                    trace_state=span.trace_state,
                ))
    return spans


class _TraceService(TraceServiceServicer):
    def __init__(self, receiver: OtlpReceiver) -> None:
        self._receiver = receiver

    def Export(self, request: ExportTraceServiceRequest,
               context: grpc.ServicerContext) -> ExportTraceServiceResponse:
        headers = {key.lower(): value for key, value in context.invocation_metadata()
                   if isinstance(value, str)}
        self._receiver._record("grpc", request, headers)
        return ExportTraceServiceResponse()


class _HttpHandler(BaseHTTPRequestHandler):
    # HTTP/1.0 closes each connection after its response: no idle keep-alive thread is left
    # blocked in a read when the receiver stops. The exporter reconnects per request; on loopback
    # that costs nothing.
    protocol_version = "HTTP/1.0"
    server: _HttpServer

    def do_POST(self) -> None:
        if self.path.split("?", 1)[0] != HTTP_TRACES_PATH:
            self._reply(HTTPStatus.NOT_FOUND, f"only POST {HTTP_TRACES_PATH} is served")
            return
        content_type = self.headers.get("Content-Type", "").split(";", 1)[0].strip().lower()
        if content_type != "application/x-protobuf":
            self._reply(HTTPStatus.UNSUPPORTED_MEDIA_TYPE,
                        f"Content-Type {content_type!r}: only application/x-protobuf is decoded")
            return
        length = self.headers.get("Content-Length")
        if length is None or not length.isdigit():
            self._reply(HTTPStatus.LENGTH_REQUIRED, "a Content-Length is required")
            return
        if int(length) > MAX_REQUEST_BYTES:
            self._reply(HTTPStatus.REQUEST_ENTITY_TOO_LARGE, f"over {MAX_REQUEST_BYTES} bytes")
            return
        body = self.rfile.read(int(length))
        encoding = self.headers.get("Content-Encoding", "identity").strip().lower()
        try:
            body = _decompress(body, encoding)
            request = ExportTraceServiceRequest.FromString(body)
        except _UnsupportedEncoding:
            self._reply(HTTPStatus.UNSUPPORTED_MEDIA_TYPE, f"Content-Encoding {encoding!r}")
            return
        except (OSError, EOFError, zlib.error, DecodeError) as error:
            self._reply(HTTPStatus.BAD_REQUEST, f"undecodable body: {error}")
            return
        headers = {key.lower(): value for key, value in self.headers.items()}
        self.server.receiver._record("http", request, headers)
        payload = ExportTraceServiceResponse().SerializeToString()
        self.send_response(HTTPStatus.OK)
        self.send_header("Content-Type", "application/x-protobuf")
        self.send_header("Content-Length", str(len(payload)))
        self.end_headers()
        self.wfile.write(payload)

    def _reply(self, status: HTTPStatus, message: str) -> None:
        payload = message.encode()
        self.send_response(status)
        self.send_header("Content-Type", "text/plain; charset=utf-8")
        self.send_header("Content-Length", str(len(payload)))
        self.end_headers()
        self.wfile.write(payload)

    def log_message(self, format: str, *args: Any) -> None:
        # One line per export on stderr would only bury the test output.
        pass


class _HttpServer(ThreadingHTTPServer):
    daemon_threads = True

    def __init__(self, receiver: OtlpReceiver) -> None:
        super().__init__(("127.0.0.1", 0), _HttpHandler)
        self.receiver = receiver


class _UnsupportedEncoding(Exception):
    pass


def _decompress(body: bytes, encoding: str) -> bytes:
    if encoding in ("", "identity"):
        return body
    if encoding == "gzip":
        return gzip.decompress(body)
    if encoding == "deflate":
        # The Python exporter sends zlib-wrapped deflate (zlib.compress), as HTTP's "deflate"
        # means; some clients send raw deflate instead, which the negative window size reads.
        try:
            return zlib.decompress(body)
        except zlib.error:
            return zlib.decompress(body, -zlib.MAX_WBITS)
    raise _UnsupportedEncoding(encoding)


class OtlpReceiver:
    """OTLP/gRPC and OTLP/HTTP trace receivers on loopback, collecting spans in memory.

    Use as a context manager, or call ``start()`` and ``stop()``. See the module's docstring for
    how to point a process at it.
    """

    def __init__(self, grpc_workers: int = 4) -> None:
        self._grpc_workers = grpc_workers
        self._cond = threading.Condition()
        self._spans: list[ReceivedSpan] = []
        self._exports: list[ReceivedExport] = []
        self._grpc_server: grpc.Server | None = None
        self._grpc_pool: ThreadPoolExecutor | None = None
        self._grpc_port = 0
        self._http_server: _HttpServer | None = None
        self._http_thread: threading.Thread | None = None

    # -- life cycle ---------------------------------------------------------------------------

    def start(self) -> OtlpReceiver:
        if self._grpc_server is not None:
            return self
        pool = ThreadPoolExecutor(max_workers=self._grpc_workers,
                                  thread_name_prefix="otlp-grpc-receiver")
        server = grpc.server(pool, options=[
            ("grpc.max_receive_message_length", MAX_REQUEST_BYTES),
        ])
        add_TraceServiceServicer_to_server(_TraceService(self), server)
        port = server.add_insecure_port("127.0.0.1:0")
        if port == 0:
            pool.shutdown(wait=False)
            raise RuntimeError("the OTLP/gRPC receiver could not bind a loopback port")
        server.start()
        http_server = _HttpServer(self)
        # serve_forever notices shutdown() only between polls: a short interval keeps stop() fast.
        http_thread = threading.Thread(target=http_server.serve_forever, args=(0.05,),
                                       name="otlp-http-receiver", daemon=True)
        http_thread.start()
        self._grpc_server, self._grpc_pool, self._grpc_port = server, pool, port
        self._http_server, self._http_thread = http_server, http_thread
        return self

    def stop(self) -> None:
        if self._grpc_server is not None:
            # A short grace lets an export already in flight finish rather than fail mid-call.
            self._grpc_server.stop(grace=1.0).wait()
            self._grpc_server = None
        if self._grpc_pool is not None:
            # grpc.server does not own the executor it is given.
            self._grpc_pool.shutdown(wait=True)
            self._grpc_pool = None
        if self._http_server is not None:
            self._http_server.shutdown()
            self._http_server.server_close()
            self._http_server = None
        if self._http_thread is not None:
            self._http_thread.join()
            self._http_thread = None

    def __enter__(self) -> OtlpReceiver:
        return self.start()

    def __exit__(self, exc_type: type[BaseException] | None, exc: BaseException | None,
                 tb: TracebackType | None) -> None:
        self.stop()

    # -- endpoints ----------------------------------------------------------------------------

    @property
    def grpc_endpoint(self) -> str:
        """``http://127.0.0.1:PORT``: for ``OTEL_EXPORTER_OTLP_ENDPOINT`` (or ``..._TRACES_...``)
        with the gRPC protocol, or the gRPC exporter's ``endpoint=``."""
        if self._grpc_server is None:
            raise RuntimeError("the receiver is not started")
        return f"http://127.0.0.1:{self._grpc_port}"

    @property
    def http_endpoint(self) -> str:
        """``http://127.0.0.1:PORT``: the base for ``OTEL_EXPORTER_OTLP_ENDPOINT`` with
        http/protobuf (the exporter appends ``/v1/traces``)."""
        if self._http_server is None:
            raise RuntimeError("the receiver is not started")
        return f"http://127.0.0.1:{self._http_server.server_address[1]}"

    @property
    def http_traces_endpoint(self) -> str:
        """``http://127.0.0.1:PORT/v1/traces``: for ``OTEL_EXPORTER_OTLP_TRACES_ENDPOINT`` or the
        HTTP exporter's ``endpoint=``, both of which are used verbatim."""
        return self.http_endpoint + HTTP_TRACES_PATH

    # -- what arrived -------------------------------------------------------------------------

    def _record(self, transport: Transport, request: ExportTraceServiceRequest,
                headers: Mapping[str, str]) -> None:
        spans = flatten_request(request, transport)
        with self._cond:
            self._spans.extend(spans)
            self._exports.append(ReceivedExport(transport, len(spans), dict(headers)))
            self._cond.notify_all()

    def spans(self) -> list[ReceivedSpan]:
        """Every span received so far, in arrival order (a copy)."""
        with self._cond:
            return list(self._spans)

    def exports(self) -> list[ReceivedExport]:
        """Every export request accepted so far, in arrival order (a copy)."""
        with self._cond:
            return list(self._exports)

    def clear(self) -> None:
        """Forgets what has been received, e.g. between phases of one test."""
        with self._cond:
            self._spans.clear()
            self._exports.clear()

    def wait_for(self, predicate: Callable[[list[ReceivedSpan]], bool],
                 timeout: float) -> list[ReceivedSpan]:
        """Blocks until ``predicate`` holds over the spans received so far; returns them.

        The predicate is evaluated on a copy, once now and again after each export arrives.
        Raises ``TimeoutError``, describing what did arrive, after ``timeout`` seconds.
        """
        deadline = time.monotonic() + timeout
        with self._cond:
            while True:
                snapshot = list(self._spans)
                if predicate(snapshot):
                    return snapshot
                remaining = deadline - time.monotonic()
                if remaining <= 0:
                    raise TimeoutError(
                        f"OTLP receiver: condition not met within {timeout:g} s; "
                        + self._summary(snapshot))
                self._cond.wait(remaining)

    def _summary(self, spans: list[ReceivedSpan]) -> str:
        if not spans:
            return (f"no spans arrived ({len(self._exports)} export request(s)); gRPC at "
                    f"{self.grpc_endpoint if self._grpc_server else '(stopped)'}, HTTP at "
                    f"{self.http_traces_endpoint if self._http_server else '(stopped)'}")
        shown = 20
        lines = [f"{len(spans)} span(s) in {len(self._exports)} export request(s):"]
        lines += [f"  {s.transport:4} {s.name!r} trace={s.trace_id} span={s.span_id} "
                  f"parent={s.parent_span_id or '-'} service={s.resource.get('service.name')!r}"
                  for s in spans[:shown]]
        if len(spans) > shown:
            lines.append(f"  ... and {len(spans) - shown} more")
        return "\n".join(lines)
