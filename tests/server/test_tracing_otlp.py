"""End to end: the server, configured by ``OTEL_*`` variables alone, exports its spans over
OTLP/gRPC and OTLP/HTTP to a receiver on loopback, the last ones flushed on SIGTERM.

A stream that carries a W3C ``traceparent`` gets its requests' ``llm_request`` spans in that
trace, and the step spans that served them link to them; a stream without one gets root spans.
Triton's ``TraceSetting`` turns tracing off and on at run time. A collector that never answers
(or a closed port) holds SIGTERM for ``FLUSH_SECONDS`` at most, whatever the exporter's timeout.
"""

from __future__ import annotations

import contextlib
import json
import queue
import socket
import time
import urllib.request
from collections.abc import Iterator
from typing import Any

import pytest
import tritonclient.grpc as grpcclient

from pagedserve.engine.tracing import FLUSH_SECONDS
from pagedserve.server.app import STOP_SECONDS
from tests.otlp_receiver import OtlpReceiver, ReceivedSpan
from tests.server.conftest import (
    DEFAULT_REPOSITORY,
    MODEL,
    ServerHandle,
    free_port,
    is_final,
    llm_inputs,
    start_server,
)

pytestmark = pytest.mark.slow

TRACE_ID = "0af7651916cd43dd8448eb211c80319c"
PARENT_ID = "b7ad6b7169203331"


def _stream(server: ServerHandle, requests: list[tuple[str, int]],
            headers: dict[str, str] | None = None) -> None:
    """Runs the requests (id, max_tokens) on one stream until each has its final response."""
    client = grpcclient.InferenceServerClient(server.grpc_url)
    results: queue.Queue[tuple[Any, Any]] = queue.Queue()
    client.start_stream(callback=lambda result, error: results.put((result, error)),
                        headers=headers)
    for request_id, max_tokens in requests:
        # EOS ignored: each request makes its max_tokens, which its span must count.
        client.async_stream_infer(MODEL, llm_inputs("Tell me about tracing.", max_tokens,
                                                    params={"ignore_eos": True}),
                                  request_id=request_id)
    done = 0
    while done < len(requests):
        result, error = results.get(timeout=120)
        assert error is None, error
        done += is_final(result)
    client.stop_stream()
    client.close()


def _requests(spans: list[ReceivedSpan]) -> list[ReceivedSpan]:
    return [s for s in spans if s.name == "llm_request"]


@pytest.fixture(params=["grpc", "http/protobuf"])
def traced_server(request: pytest.FixtureRequest) -> Iterator[tuple[ServerHandle, OtlpReceiver]]:
    with OtlpReceiver() as receiver:
        endpoint = receiver.grpc_endpoint if request.param == "grpc" else receiver.http_endpoint
        handle = start_server(DEFAULT_REPOSITORY, env={
            "OTEL_EXPORTER_OTLP_ENDPOINT": endpoint,
            "OTEL_EXPORTER_OTLP_TRACES_PROTOCOL": request.param,
            "OTEL_SERVICE_NAME": "pagedserve-under-test",
            # A long batch delay: only the shutdown flush can deliver the last spans.
            "OTEL_BSP_SCHEDULE_DELAY": "60000",
            "NO_PROXY": "127.0.0.1,localhost", "no_proxy": "127.0.0.1,localhost",
        })
        try:
            yield handle, receiver
        finally:
            handle.stop()


def test_spans_reach_a_collector_and_link_requests_to_steps(
        traced_server: tuple[ServerHandle, OtlpReceiver]) -> None:
    server, receiver = traced_server
    traceparent = {"traceparent": f"00-{TRACE_ID}-{PARENT_ID}-01"}
    _stream(server, [("traced-a", 6), ("traced-b", 4)], headers=traceparent)
    _stream(server, [("untraced", 3)])
    # The HTTP doors carry the trace context in the same header.
    for path, body in ((f"/v2/models/{MODEL}/generate",
                        {"text_input": "Tell me about tracing.",
                         "parameters": {"max_tokens": 5, "ignore_eos": True}}),
                       ("/v1/completions", {"model": MODEL, "prompt": "Tell me about tracing.",
                                            "max_tokens": 5, "ignore_eos": True})):
        request = urllib.request.Request(server.http_url + path, json.dumps(body).encode(),
                                         headers={**traceparent,
                                                  "Content-Type": "application/json"})
        with urllib.request.urlopen(request, timeout=120) as response:
            assert response.status == 200
    assert server.stop() == 0  # SIGTERM: drained, spans flushed before exit
    spans = receiver.wait_for(lambda got: len(_requests(got)) >= 5, timeout=30)
    requests = _requests(spans)
    assert len(requests) == 5
    assert all(s.resource["service.name"] == "pagedserve-under-test" for s in spans)
    in_trace = [s for s in requests if s.trace_id == TRACE_ID]
    assert len(in_trace) == 4 and all(s.parent_span_id == PARENT_ID for s in in_trace)
    root = [s for s in requests if s.trace_id != TRACE_ID]
    assert len(root) == 1 and root[0].parent_span_id == ""
    for span in requests:
        assert span.kind == "SERVER"
        assert span.attributes["model.name"] == MODEL
        assert span.attributes["gen_ai.usage.prompt_tokens"] > 0
        assert span.attributes["gen_ai.usage.completion_tokens"] == \
            span.attributes["gen_ai.request.max_tokens"]
        assert span.events[0].name == "queued"
        assert {"first_scheduled", "first_token", "finished"} <= {e.name for e in span.events}
    steps = [s for s in spans if s.name == "engine.step"]
    linked = {(link.trace_id, link.span_id) for s in steps for link in s.links}
    assert all((s.trace_id, s.span_id) in linked for s in requests)
    assert {s.attributes["engine.step"] for s in steps} == set(range(1, len(steps) + 1))
    phases = [s for s in spans if s.name.startswith("engine.step.")]
    assert len(phases) == 4 * len(steps)


def test_trace_setting_turns_tracing_off_and_on(
        traced_server: tuple[ServerHandle, OtlpReceiver]) -> None:
    server, receiver = traced_server
    client = grpcclient.InferenceServerClient(server.grpc_url)
    settings = client.get_trace_settings(as_json=True)["settings"]
    assert settings["trace_level"]["value"] == ["TIMESTAMPS"]
    assert settings["trace_mode"]["value"] == ["opentelemetry"]
    client.update_trace_settings(settings={"trace_level": ["OFF"]})
    _stream(server, [("while-off", 2)])
    client.update_trace_settings(settings={"trace_level": ["TIMESTAMPS"], "trace_rate": "1"})
    _stream(server, [("while-on", 2)])
    with pytest.raises(Exception, match="trace_rate must be at least 1"):
        client.update_trace_settings(settings={"trace_rate": "0"})
    client.close()
    assert server.stop() == 0
    spans = receiver.wait_for(lambda got: len(_requests(got)) >= 1, timeout=30)
    assert len(_requests(spans)) == 1  # the request sent while tracing was on


# Seconds allowed beyond a promised bound for a busy machine's scheduling (test_shutdown's).
MARGIN = 30
GRACE = 30


@pytest.mark.parametrize(("protocol", "collector"), [
    ("http/protobuf", "silent"), ("grpc", "silent"), ("http/protobuf", "closed")])
def test_an_unreachable_collector_does_not_hold_the_exit(protocol: str, collector: str) -> None:
    """Spans buffered for a collector that accepts connections and never answers (or a port
    nobody listens on): the engine's flush and the exporter's shutdown at SIGTERM give up
    after ``FLUSH_SECONDS`` each time, and the exit is orderly. With the exporter's timeout at
    600 s, an unbounded flush would outlast the grace period's leftover plus ``STOP_SECONDS``
    and end in the forced exit."""
    with contextlib.ExitStack() as stack:
        if collector == "silent":  # the kernel accepts the connections; nobody reads them
            listener = stack.enter_context(socket.socket())
            listener.bind(("127.0.0.1", 0))
            listener.listen(64)
            port = listener.getsockname()[1]
        else:
            port = free_port()
        server = start_server(DEFAULT_REPOSITORY, "--grace-period", str(GRACE), env={
            "OTEL_EXPORTER_OTLP_ENDPOINT": f"http://127.0.0.1:{port}",
            "OTEL_EXPORTER_OTLP_TRACES_PROTOCOL": protocol,
            "OTEL_EXPORTER_OTLP_TIMEOUT": "600",  # seconds, for each export
            "OTEL_BSP_SCHEDULE_DELAY": "60000",  # only the flushes export
            "NO_PROXY": "127.0.0.1,localhost", "no_proxy": "127.0.0.1,localhost",
        })
        stack.callback(server.stop)
        _stream(server, [("buffered", 4)])
        signalled = time.monotonic()
        assert server.stop(timeout=GRACE + STOP_SECONDS + MARGIN) == 0
        took = time.monotonic() - signalled
        print(f"{protocol} to a {collector} collector: exit {took:.1f} s after SIGTERM")
        log = server.log()
        assert f"span export did not finish within {FLUSH_SECONDS:g} s" in log, log
        assert "Shutdown took over" not in log and "Server stopped" in log, log
        assert took < FLUSH_SECONDS + MARGIN, took
