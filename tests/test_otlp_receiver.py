"""The in-test OTLP receiver against the real SDK exporters, over gRPC and HTTP."""

from __future__ import annotations

import gzip
import os
import subprocess
import sys
import textwrap
import threading
import urllib.error
import urllib.request
import zlib
from collections.abc import Iterator
from typing import Any

import grpc
import pytest
from opentelemetry import trace
from opentelemetry.exporter.otlp.proto.grpc.exporter import InvalidCompressionValueException
from opentelemetry.exporter.otlp.proto.grpc.trace_exporter import (
    OTLPSpanExporter as GrpcSpanExporter,
)
from opentelemetry.exporter.otlp.proto.http.trace_exporter import (
    OTLPSpanExporter as HttpSpanExporter,
)
from opentelemetry.proto.collector.trace.v1.trace_service_pb2 import (
    ExportTraceServiceRequest,
    ExportTraceServiceResponse,
)
from opentelemetry.proto.collector.trace.v1.trace_service_pb2_grpc import TraceServiceStub
from opentelemetry.proto.common.v1.common_pb2 import (
    AnyValue,
    ArrayValue,
    KeyValue,
    KeyValueList,
)
from opentelemetry.proto.trace.v1.trace_pb2 import ResourceSpans, ScopeSpans, Span
from opentelemetry.sdk.resources import Resource
from opentelemetry.sdk.trace import ReadableSpan, TracerProvider
from opentelemetry.sdk.trace.export import SimpleSpanProcessor, SpanExporter, SpanExportResult
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter
from opentelemetry.trace import (
    Link,
    NonRecordingSpan,
    SpanContext,
    SpanKind,
    Status,
    StatusCode,
    TraceFlags,
    TraceState,
)

from tests.otlp_receiver import (
    OtlpReceiver,
    ReceivedEvent,
    ReceivedLink,
    ReceivedSpan,
    Transport,
    decode_any_value,
)

TIMEOUT = 5.0

# Attribute values of every kind the SDK accepts on a span (it stores sequences as tuples).
ALL_KINDS: dict[str, Any] = {
    "str": "hello",
    "empty_str": "",
    "bool": True,
    "int": -(2**62),
    "zero": 0,
    "float": 0.25,
    "bytes": b"\x00\xffraw",
    "strs": ("a", "b"),
    "ints": (1, 2, 3),
    "floats": (1.5, -2.0),
    "bools": (True, False),
    "empty": (),
    "mixed": (1, "two", None),
    "map": {"k": "v", "n": 7, "inner": {"deep": (1.0,)}},
    "none": None,
}


@pytest.fixture(autouse=True)
def clean_otel_env(monkeypatch: pytest.MonkeyPatch) -> None:
    """Exporters read OTEL_EXPORTER_OTLP_* from the environment; a developer's own settings must
    not leak in, and a configured proxy must not swallow loopback traffic."""
    for name in list(os.environ):
        if name.startswith("OTEL_"):
            monkeypatch.delenv(name)
    monkeypatch.setenv("NO_PROXY", "127.0.0.1,localhost")
    monkeypatch.setenv("no_proxy", "127.0.0.1,localhost")


@pytest.fixture
def rx() -> Iterator[OtlpReceiver]:
    with OtlpReceiver() as receiver:
        yield receiver


def expected(span: ReadableSpan, transport: Transport) -> ReceivedSpan:
    """What the receiver should make of an SDK span, computed from the SDK's own view."""
    assert span.context is not None and span.start_time and span.end_time
    return ReceivedSpan(
        name=span.name,
        trace_id=format(span.context.trace_id, "032x"),
        span_id=format(span.context.span_id, "016x"),
        parent_span_id=format(span.parent.span_id, "016x") if span.parent else "",
        kind=span.kind.name,
        start_ns=span.start_time,
        end_ns=span.end_time,
        attributes=dict(span.attributes or {}),
        events=[ReceivedEvent(e.name, e.timestamp, dict(e.attributes or {})) for e in span.events],
        links=[ReceivedLink(format(link.context.trace_id, "032x"),
                            format(link.context.span_id, "016x"), dict(link.attributes or {}))
               for link in span.links],
        resource=dict(span.resource.attributes),
        scope=span.instrumentation_scope.name if span.instrumentation_scope else "",
        transport=transport,
        scope_version=(span.instrumentation_scope.version or "") if span.instrumentation_scope
        else "",
        status_code=span.status.status_code.name,
        status_message=span.status.description or "",
        trace_state=span.context.trace_state.to_header(),
    )


def make_exporter(rx: OtlpReceiver, transport: Transport) -> SpanExporter:
    if transport == "grpc":
        return GrpcSpanExporter(endpoint=rx.grpc_endpoint, insecure=True)
    # The HTTP exporter uses endpoint= verbatim, so it gets the full signal URL.
    return HttpSpanExporter(endpoint=rx.http_traces_endpoint)


def emit_tree(provider: TracerProvider) -> None:
    """A root server span with a client child (an event, a link, every attribute kind), and the
    link's target: a span in another trace, under a remote parent carrying a trace state."""
    tracer = provider.get_tracer("otlp-receiver-test", "1.2.3")
    remote = SpanContext(trace_id=0x0AF7651916CD43DD8448EB211C80319C, span_id=0xB7AD6B7169203331,
                         is_remote=True, trace_flags=TraceFlags(TraceFlags.SAMPLED),
                         trace_state=TraceState([("vendor", "v1"), ("other", "x")]))
    with tracer.start_as_current_span(
            "other", context=trace.set_span_in_context(NonRecordingSpan(remote))) as other:
        pass
    with (
        tracer.start_as_current_span("root", kind=SpanKind.SERVER,
                                     attributes={"http.route": "/generate"}),
        tracer.start_as_current_span(
            "child", kind=SpanKind.CLIENT, attributes=ALL_KINDS,
            links=[Link(other.get_span_context(), {"link.why": "batched", "n": 2})]) as child,
    ):
        child.add_event("first token", {"token.id": 42, "text": "Hi", "ok": True, "ids": (1, 2)})
        child.set_status(Status(StatusCode.ERROR, "cancelled by client"))


@pytest.mark.parametrize("transport", ["grpc", "http"])
def test_sdk_exporter_round_trip(rx: OtlpReceiver, transport: Transport) -> None:
    memory = InMemorySpanExporter()
    provider = TracerProvider(resource=Resource.create({"service.name": "pagedserve-test",
                                                        "deployment.id": 3}))
    provider.add_span_processor(SimpleSpanProcessor(memory))
    provider.add_span_processor(SimpleSpanProcessor(make_exporter(rx, transport)))
    try:
        emit_tree(provider)
        received = rx.wait_for(lambda spans: len(spans) >= 3, TIMEOUT)
    finally:
        provider.shutdown()

    by_name = {span.name: span for span in received}
    assert len(received) == 3 and set(by_name) == {"root", "child", "other"}
    # Exactly what the SDK held: ids, parents, kinds, times, attributes, events, links, resource.
    sdk_spans = {span.name: expected(span, transport) for span in memory.get_finished_spans()}
    assert by_name == sdk_spans

    # The same, spelled out, so that a fault in expected() could not hide one in the receiver.
    root, child, other = by_name["root"], by_name["child"], by_name["other"]
    assert root.parent_span_id == "" and root.kind == "SERVER"
    assert child.parent_span_id == root.span_id and child.trace_id == root.trace_id
    assert child.kind == "CLIENT" and len(child.span_id) == 16 and len(child.trace_id) == 32
    assert root.start_ns <= child.start_ns <= child.end_ns <= root.end_ns
    assert child.attributes == ALL_KINDS
    assert child.events == [ReceivedEvent("first token", child.events[0].time_ns,
                                          {"token.id": 42, "text": "Hi", "ok": True,
                                           "ids": (1, 2)})]
    assert child.start_ns <= child.events[0].time_ns <= child.end_ns
    assert child.links == [ReceivedLink(other.trace_id, other.span_id,
                                        {"link.why": "batched", "n": 2})]
    assert child.status_code == "ERROR" and child.status_message == "cancelled by client"
    assert other.trace_id == "0af7651916cd43dd8448eb211c80319c"
    assert other.parent_span_id == "b7ad6b7169203331"
    assert other.trace_state == "vendor=v1,other=x"
    for span in received:
        assert span.resource["service.name"] == "pagedserve-test"
        assert span.resource["deployment.id"] == 3
        assert span.scope == "otlp-receiver-test" and span.scope_version == "1.2.3"
        assert span.transport == transport
    assert [e.transport for e in rx.exports()] == [transport] * 3


@pytest.mark.parametrize(("transport", "compression"), [
    ("http", "none"), ("http", "gzip"), ("http", "deflate"), ("grpc", "gzip"),
])
def test_compression_from_env(rx: OtlpReceiver, monkeypatch: pytest.MonkeyPatch,
                              transport: Transport, compression: str) -> None:
    # Both exporters read OTEL_EXPORTER_OTLP_COMPRESSION; neither compresses by default.
    monkeypatch.setenv("OTEL_EXPORTER_OTLP_COMPRESSION", compression)
    provider = TracerProvider(resource=Resource.create({"service.name": "compressed"}))
    provider.add_span_processor(SimpleSpanProcessor(make_exporter(rx, transport)))
    try:
        with provider.get_tracer("t").start_as_current_span("squeezed",
                                                           attributes={"x": "y" * 500}):
            pass
        [span] = rx.wait_for(lambda spans: len(spans) >= 1, TIMEOUT)
    finally:
        provider.shutdown()
    assert span.name == "squeezed" and span.attributes == {"x": "y" * 500}
    assert span.resource["service.name"] == "compressed"
    if transport == "http":
        # gRPC compresses inside its own framing, invisible here; HTTP says so in a header.
        headers = rx.exports()[0].headers
        assert headers.get("content-encoding", "none") == compression
        assert headers["content-type"] == "application/x-protobuf"


@pytest.mark.parametrize("compression", ["none", "deflate"])
def test_grpc_exporter_refuses_other_compression_values(monkeypatch: pytest.MonkeyPatch,
                                                        compression: str) -> None:
    """A trap the module's docstring warns of: the gRPC exporter accepts only an unset variable
    or "gzip", and raises while being constructed for anything else, "none" included."""
    monkeypatch.setenv("OTEL_EXPORTER_OTLP_COMPRESSION", compression)
    with pytest.raises(InvalidCompressionValueException):
        GrpcSpanExporter(endpoint="http://127.0.0.1:1", insecure=True)


def one_span(name: str = "direct") -> ReadableSpan:
    """A finished SDK span to hand an exporter directly, so its export result can be checked."""
    provider = TracerProvider(resource=Resource.create({"service.name": "direct"}))
    span = provider.get_tracer("t").start_span(name)
    span.end()
    assert isinstance(span, ReadableSpan)
    return span


@pytest.mark.parametrize(("transport", "variable", "value"), [
    ("grpc", "OTEL_EXPORTER_OTLP_ENDPOINT", "grpc_endpoint"),
    ("grpc", "OTEL_EXPORTER_OTLP_TRACES_ENDPOINT", "grpc_endpoint"),
    ("http", "OTEL_EXPORTER_OTLP_ENDPOINT", "http_endpoint"),
    ("http", "OTEL_EXPORTER_OTLP_TRACES_ENDPOINT", "http_traces_endpoint"),
])
def test_endpoint_variables(rx: OtlpReceiver, monkeypatch: pytest.MonkeyPatch,
                            transport: Transport, variable: str, value: str) -> None:
    """The variable/value pairs of the module's docstring. No insecure=True for gRPC: the
    http:// scheme alone must select a plaintext channel."""
    monkeypatch.setenv(variable, getattr(rx, value))
    exporter = GrpcSpanExporter() if transport == "grpc" else HttpSpanExporter()
    try:
        assert exporter.export([one_span()]) is SpanExportResult.SUCCESS
    finally:
        exporter.shutdown()
    [span] = rx.wait_for(lambda spans: len(spans) >= 1, TIMEOUT)
    assert span.name == "direct" and span.transport == transport


def test_http_traces_endpoint_is_not_completed(rx: OtlpReceiver,
                                               monkeypatch: pytest.MonkeyPatch) -> None:
    """Unlike OTEL_EXPORTER_OTLP_ENDPOINT, the per-signal variable gets no /v1/traces appended:
    given the bare base, the HTTP exporter posts to / and fails (404, not retried)."""
    monkeypatch.setenv("OTEL_EXPORTER_OTLP_TRACES_ENDPOINT", rx.http_endpoint)
    exporter = HttpSpanExporter()
    try:
        assert exporter.export([one_span()]) is SpanExportResult.FAILURE
    finally:
        exporter.shutdown()
    assert rx.spans() == [] and rx.exports() == []


SUBPROCESS = textwrap.dedent("""
    import os

    from opentelemetry.sdk.resources import Resource
    from opentelemetry.sdk.trace import TracerProvider
    from opentelemetry.sdk.trace.export import BatchSpanProcessor

    # The exporter classes ignore the PROTOCOL variable (only SDK auto-configuration reads it),
    # so the process picks its class from it, as a hand-configured service would.
    protocol = os.environ["OTEL_EXPORTER_OTLP_TRACES_PROTOCOL"]
    if protocol == "grpc":
        from opentelemetry.exporter.otlp.proto.grpc.trace_exporter import OTLPSpanExporter
    elif protocol == "http/protobuf":
        from opentelemetry.exporter.otlp.proto.http.trace_exporter import OTLPSpanExporter
    else:
        raise SystemExit(f"unsupported protocol {protocol!r}")

    provider = TracerProvider(resource=Resource.create())
    provider.add_span_processor(BatchSpanProcessor(OTLPSpanExporter()))
    with provider.get_tracer("subprocess").start_as_current_span("from-env") as span:
        span.set_attribute("pid", os.getpid())
    provider.shutdown()
    print(os.getpid())
""")


@pytest.mark.parametrize(("protocol", "transport"), [("grpc", "grpc"), ("http/protobuf", "http")])
def test_configured_by_env_in_subprocess(rx: OtlpReceiver, protocol: str,
                                         transport: Transport) -> None:
    # The fixture already stripped OTEL_* and set NO_PROXY in os.environ.
    env = dict(os.environ)
    env["OTEL_EXPORTER_OTLP_ENDPOINT"] = (rx.grpc_endpoint if transport == "grpc"
                                          else rx.http_endpoint)
    env["OTEL_EXPORTER_OTLP_TRACES_PROTOCOL"] = protocol
    env["OTEL_SERVICE_NAME"] = "pagedserve-env"
    proc = subprocess.run([sys.executable, "-c", SUBPROCESS], env=env, capture_output=True,
                          text=True, timeout=30)
    assert proc.returncode == 0, proc.stderr
    # shutdown() flushed the batch before the process exited: the span is already here.
    try:
        [span] = rx.wait_for(lambda spans: len(spans) >= 1, TIMEOUT)
    except TimeoutError as error:
        raise AssertionError(f"{error}\nsubprocess stderr:\n{proc.stderr}") from error
    assert span.name == "from-env" and span.transport == transport
    assert span.resource["service.name"] == "pagedserve-env"
    assert span.resource["telemetry.sdk.language"] == "python"
    assert span.attributes["pid"] == int(proc.stdout)  # this very process sent it
    assert span.scope == "subprocess" and span.parent_span_id == ""


def test_decode_any_value() -> None:
    def kv(key: str, value: AnyValue) -> KeyValue:
        return KeyValue(key=key, value=value)

    value = AnyValue(kvlist_value=KeyValueList(values=[
        kv("s", AnyValue(string_value="x")),
        kv("b", AnyValue(bool_value=False)),
        kv("i", AnyValue(int_value=0)),
        kv("d", AnyValue(double_value=-1.5)),
        kv("raw", AnyValue(bytes_value=b"\x01\x02")),
        kv("arr", AnyValue(array_value=ArrayValue(values=[
            AnyValue(int_value=1), AnyValue(array_value=ArrayValue()), AnyValue()]))),
        kv("nested", AnyValue(kvlist_value=KeyValueList(values=[
            kv("leaf", AnyValue(string_value=""))]))),
        kv("unset", AnyValue()),
    ]))
    # Through the wire format, as the receivers see it: zero values and empty containers keep
    # their oneof case.
    decoded = decode_any_value(AnyValue.FromString(value.SerializeToString()))
    assert decoded == {"s": "x", "b": False, "i": 0, "d": -1.5, "raw": b"\x01\x02",
                       "arr": (1, (), None), "nested": {"leaf": ""}, "unset": None}


def hand_made_request() -> ExportTraceServiceRequest:
    span = Span(trace_id=bytes(range(16)), span_id=bytes(range(8)), name="hand-made",
                kind=Span.SpanKind.SPAN_KIND_UNSPECIFIED, start_time_unix_nano=1,
                end_time_unix_nano=2)
    return ExportTraceServiceRequest(resource_spans=[ResourceSpans(
        scope_spans=[ScopeSpans(spans=[span])])])


def post(url: str, body: bytes, headers: dict[str, str]) -> tuple[int, bytes]:
    # No proxy handler: the request must reach loopback directly whatever the environment says.
    opener = urllib.request.build_opener(urllib.request.ProxyHandler({}))
    request = urllib.request.Request(url, data=body, headers=headers, method="POST")
    try:
        with opener.open(request, timeout=TIMEOUT) as response:
            return response.status, response.read()
    except urllib.error.HTTPError as error:
        return error.code, error.read()


@pytest.mark.parametrize("encoding", ["identity", "gzip", "deflate", "raw-deflate"])
def test_http_by_hand(rx: OtlpReceiver, encoding: str) -> None:
    """Bodies as other clients send them, including raw deflate, which Python's exporter never
    sends; the answer is an ExportTraceServiceResponse."""
    body = hand_made_request().SerializeToString()
    headers = {"Content-Type": "application/x-protobuf"}
    if encoding == "gzip":
        body = gzip.compress(body)
    elif encoding == "deflate":
        body = zlib.compress(body)
    elif encoding == "raw-deflate":
        compressor = zlib.compressobj(wbits=-zlib.MAX_WBITS)
        body = compressor.compress(body) + compressor.flush()
    if encoding != "identity":
        headers["Content-Encoding"] = encoding.removeprefix("raw-")
    status, answer = post(rx.http_traces_endpoint, body, headers)
    assert status == 200
    assert ExportTraceServiceResponse.FromString(answer) == ExportTraceServiceResponse()
    [span] = rx.spans()
    assert span == ReceivedSpan(
        name="hand-made", trace_id="000102030405060708090a0b0c0d0e0f", span_id="0001020304050607",
        parent_span_id="", kind="UNSPECIFIED", start_ns=1, end_ns=2, attributes={}, events=[],
        links=[], resource={}, scope="", transport="http")


def test_http_refusals(rx: OtlpReceiver) -> None:
    body = hand_made_request().SerializeToString()
    protobuf = {"Content-Type": "application/x-protobuf"}
    assert post(rx.http_endpoint + "/v1/metrics", body, protobuf)[0] == 404
    assert post(rx.http_traces_endpoint, b"{}", {"Content-Type": "application/json"})[0] == 415
    assert post(rx.http_traces_endpoint, body, {**protobuf, "Content-Encoding": "br"})[0] == 415
    assert post(rx.http_traces_endpoint, b"\xff\xff\xff", protobuf)[0] == 400
    assert post(rx.http_traces_endpoint, b"not gzip",
                {**protobuf, "Content-Encoding": "gzip"})[0] == 400
    assert rx.spans() == [] and rx.exports() == []


def test_grpc_by_hand_with_metadata(rx: OtlpReceiver) -> None:
    with grpc.insecure_channel(rx.grpc_endpoint.removeprefix("http://")) as channel:
        answer = TraceServiceStub(channel).Export(hand_made_request(), timeout=TIMEOUT,
                                                  metadata=[("x-tenant", "acme")])
    assert answer == ExportTraceServiceResponse()
    [export] = rx.exports()
    assert export.transport == "grpc" and export.span_count == 1
    assert export.headers["x-tenant"] == "acme"
    assert rx.spans()[0].name == "hand-made"


def test_wait_for_wakes_on_arrival(rx: OtlpReceiver) -> None:
    """wait_for blocks on the condition and returns as soon as a later export satisfies it."""
    exporter = make_exporter(rx, "http")
    waiting = threading.Event()
    results: list[SpanExportResult] = []

    def export_once_waiting() -> None:
        waiting.wait(TIMEOUT)
        results.append(exporter.export([one_span("late")]))

    sender = threading.Thread(target=export_once_waiting)
    sender.start()
    try:
        def seen(spans: list[ReceivedSpan]) -> bool:
            waiting.set()  # the first evaluation happens with the lock held, inside wait_for
            return any(span.name == "late" for span in spans)

        spans = rx.wait_for(seen, TIMEOUT)
    finally:
        sender.join()
        exporter.shutdown()
    assert [span.name for span in spans] == ["late"] and results == [SpanExportResult.SUCCESS]


def test_wait_for_times_out_with_a_summary(rx: OtlpReceiver) -> None:
    with pytest.raises(TimeoutError, match="no spans arrived"):
        rx.wait_for(lambda spans: bool(spans), timeout=0.05)
    exporter = make_exporter(rx, "grpc")
    try:
        assert exporter.export([one_span("only")]) is SpanExportResult.SUCCESS
    finally:
        exporter.shutdown()
    with pytest.raises(TimeoutError, match=r"1 span\(s\) in 1 export request\(s\):\n.*'only'"):
        rx.wait_for(lambda spans: len(spans) >= 2, timeout=0.05)
    rx.clear()
    assert rx.spans() == [] and rx.exports() == []


def test_stop_and_restart_free_ports() -> None:
    receiver = OtlpReceiver().start()
    grpc_endpoint, http_endpoint = receiver.grpc_endpoint, receiver.http_endpoint
    assert grpc_endpoint.startswith("http://127.0.0.1:") and http_endpoint != grpc_endpoint
    receiver.stop()
    receiver.stop()  # idempotent
    with pytest.raises(RuntimeError, match="not started"):
        _ = receiver.grpc_endpoint
    with receiver:  # started again, on fresh ports, and still receiving
        status, _ = post(receiver.http_traces_endpoint, hand_made_request().SerializeToString(),
                         {"Content-Type": "application/x-protobuf"})
        assert status == 200 and len(receiver.spans()) == 1
