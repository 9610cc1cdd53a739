"""Triton's generate extension, read with a plain HTTP client and a plain SSE reader.

A server of its own with a fault injected: a request whose seed is ``FAULT_SEED`` fails in the
sampler after its third token, which a stream must report as an ``error`` event after the
tokens it already sent, while the server goes on serving.
"""

from __future__ import annotations

import http.client
import json
from collections.abc import Iterator
from typing import Any

import pytest
import tritonclient.grpc as grpcclient

from tests.server.conftest import (
    DEFAULT_REPOSITORY,
    MODEL,
    ServerHandle,
    llm_inputs,
    start_server,
    text_of,
)

pytestmark = pytest.mark.slow
FAULT_SEED = 4242
_FAULTY_SERVER = f"""
import sys
from pagedserve.model.sampler import Sampler

original = Sampler.__call__

def call(self, logits, rows, *args, **kwargs):
    if any(r.params.seed == {FAULT_SEED} and len(r.output_token_ids) >= 3 for r in rows):
        raise RuntimeError("injected fault")
    return original(self, logits, rows, *args, **kwargs)

Sampler.__call__ = call
from pagedserve.__main__ import main
sys.exit(main(sys.argv[1:]))
"""
PROMPT = "The capital of France is"


@pytest.fixture(scope="module")
def faulty() -> Iterator[ServerHandle]:
    handle = start_server(DEFAULT_REPOSITORY, code=_FAULTY_SERVER)
    yield handle
    assert handle.stop() == 0


def _post(server: ServerHandle, path: str, body: Any) -> http.client.HTTPResponse:
    connection = http.client.HTTPConnection("127.0.0.1", server.http_port, timeout=120)
    payload = body if isinstance(body, bytes) else json.dumps(body).encode()
    connection.request("POST", path, payload, {"Content-Type": "application/json"})
    return connection.getresponse()


def _events(response: http.client.HTTPResponse) -> list[dict[str, Any]]:
    """The ``data:`` events of a Server-Sent Events body, each a JSON object."""
    events = []
    for line in response.read().decode().split("\n"):
        if line.startswith("data: "):
            events.append(json.loads(line[len("data: "):]))
        else:
            assert line == "", line  # nothing but data lines and the blank lines ending them
    return events


def _grpc_stream_text(server: ServerHandle, max_tokens: int) -> str:
    results: list[Any] = []
    client = grpcclient.InferenceServerClient(server.grpc_url)
    client.start_stream(callback=lambda result, error: results.append((result, error)))
    client.async_stream_infer(MODEL, llm_inputs(PROMPT, max_tokens))
    client.stop_stream()
    client.close()
    assert all(error is None for _, error in results)
    return "".join(text_of(r) for r, _ in results)


def test_generate_answers_one_object(faulty: ServerHandle) -> None:
    response = _post(faulty, f"/v2/models/{MODEL}/generate", {
        "text_input": PROMPT, "id": "g1", "exclude_input_in_output": True,
        "parameters": {"temperature": 0, "max_tokens": 6, "return_num_output_tokens": True}})
    assert response.status == 200 and response.getheader("Content-Type").startswith(
        "application/json")
    answer = json.loads(response.read())
    assert list(answer) == sorted(answer)  # Triton's key order
    assert answer["id"] == "g1" and answer["model_name"] == MODEL
    assert answer["model_version"] == "1" and answer["num_output_tokens"] == 6
    assert answer["text_output"] == _grpc_stream_text(faulty, 6)


def test_generate_stream_sends_one_event_per_delta(faulty: ServerHandle) -> None:
    response = _post(faulty, f"/v2/models/{MODEL}/versions/1/generate_stream", {
        "text_input": PROMPT, "stream": True,
        "parameters": {"temperature": 0, "max_tokens": 8}})
    assert response.status == 200
    assert response.getheader("Content-Type") == "text/event-stream; charset=utf-8"
    events = _events(response)
    assert len(events) == 8 and all(e["model_name"] == MODEL for e in events)
    assert "".join(e["text_output"] for e in events) == _grpc_stream_text(faulty, 8)


def test_a_failure_mid_stream_is_an_error_event(faulty: ServerHandle) -> None:
    response = _post(faulty, f"/v2/models/{MODEL}/generate_stream", {
        "text_input": PROMPT, "stream": True,
        "parameters": {"temperature": 0.5, "seed": FAULT_SEED, "max_tokens": 20}})
    assert response.status == 200
    events = _events(response)
    *tokens, last = events
    assert len(tokens) == 3 and all("text_output" in e for e in tokens)
    assert set(last) == {"error"} and "injected fault" in last["error"]
    # The server goes on.
    assert _post(faulty, f"/v2/models/{MODEL}/generate", {
        "text_input": PROMPT, "parameters": {"max_tokens": 2}}).status == 200


@pytest.mark.parametrize(("body", "status", "message"), [
    ({"text_input": PROMPT, "parameters": {"stop": ["."]}}, 400,
     "parameter 'stop' has invalid type. It should be either 'int', 'bool', or 'string'."),
    ({"text_input": PROMPT, "parameters": {"temperature": "hot"}}, 400,
     "sampling parameter 'temperature' must be of type float"),
    ({"text_input": PROMPT, "stream": "yes"}, 500, "attempt to access JSON non-boolean"),
    (b"{oops", 500, "failed to parse the request JSON buffer"),
    ([1, 2], 500, "must be a JSON object"),
])
def test_bad_requests_are_refused_before_any_event(faulty: ServerHandle, body: Any,
                                                   status: int, message: str) -> None:
    for route in ("generate", "generate_stream"):
        response = _post(faulty, f"/v2/models/{MODEL}/{route}", body)
        assert response.status == status
        assert response.getheader("Content-Type").startswith("application/json")
        error = json.loads(response.read())["error"]
        assert message in error, error


def test_unknown_models_and_versions(faulty: ServerHandle) -> None:
    for path, message in (("/v2/models/nope/generate",
                           "Request for unknown model: 'nope' is not found"),
                          (f"/v2/models/{MODEL}/versions/9/generate_stream",
                           f"Request for unknown model: '{MODEL}' version 9 is not found")):
        response = _post(faulty, path, {"text_input": PROMPT})
        assert response.status == 404 and json.loads(response.read())["error"] == message
