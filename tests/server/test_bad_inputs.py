"""Bad requests on a stream: an ``error_message`` naming the problem, and the stream lives on.

Each case sends the bad request and then a good one on the same stream; the good one must
complete. Afterwards the engine holds nothing (no half-admitted request).
"""

from __future__ import annotations

import queue
import time
from typing import Any

import numpy as np
import pytest
import tritonclient.grpc as grpcclient

from tests.server.conftest import MODEL, ServerHandle, is_final, llm_inputs, tensor

pytestmark = pytest.mark.slow


def _without(inputs: list[Any], name: str) -> list[Any]:
    return [i for i in inputs if i.name() != name]


def _ids(values: list[int]) -> Any:
    item = grpcclient.InferInput("input_ids", [len(values)], "INT64")
    item.set_data_from_numpy(np.array(values, dtype=np.int64))
    return item


def _shape2_text() -> Any:
    item = grpcclient.InferInput("text_input", [2], "BYTES")
    item.set_data_from_numpy(np.array([b"a", b"b"], dtype=np.object_))
    return item


CASES: dict[str, tuple[dict[str, Any], str]] = {
    "unknown model": ({"model_name": "nope"},
                      "Request for unknown model: 'nope' is not found"),
    "unknown version": ({"model_version": "9"},
                        f"Request for unknown model: '{MODEL}' version 9 is not found"),
    "missing prompt": ({"inputs": _without(llm_inputs("x"), "text_input")},
                       "one of the inputs 'text_input' or 'input_ids' is required"),
    "extra input": ({"inputs": [*llm_inputs("Hi"), tensor("foo", True, "BOOL")]},
                    f"unexpected inference input 'foo' for model '{MODEL}'"),
    "wrong datatype": ({"inputs": [*_without(llm_inputs("Hi"), "stream"),
                                   tensor("stream", [1], "INT32")]},
                       f"inference input 'stream' data-type is 'INT32', but model '{MODEL}' "
                       "expects 'BOOL'"),
    "wrong shape": ({"inputs": [_shape2_text(), *_without(llm_inputs("Hi"), "text_input")]},
                    f"unexpected shape for input 'text_input' for model '{MODEL}'. "
                    "Expected [1], got [2]"),
    "malformed json": ({"inputs": [*_without(llm_inputs("Hi"), "sampling_parameters"),
                                   tensor("sampling_parameters", "{max_tokens: 3", "BYTES")]},
                       "input 'sampling_parameters' is not valid JSON"),
    "json not an object": ({"inputs": [*_without(llm_inputs("Hi"), "sampling_parameters"),
                                       tensor("sampling_parameters", "[1, 2]", "BYTES")]},
                           "input 'sampling_parameters' must be a JSON object"),
    "unknown sampling parameter": ({"inputs": llm_inputs("Hi", params={"tempreature": 0.5})},
                                   "unknown sampling parameter(s): tempreature"),
    "out-of-range parameter": ({"inputs": llm_inputs("Hi", params={"top_p": 2})},
                               "top_p must be in (0, 1]"),
    "badly typed parameter": ({"inputs": llm_inputs("Hi", params={"max_tokens": "many"})},
                              "sampling parameter 'max_tokens' must be of type int"),
    "prompt too long": ({"inputs": llm_inputs("word " * 3000)},
                        "the maximum context length is 2048"),
    "empty prompt": ({"inputs": llm_inputs("")}, "input 'text_input' must not be empty"),
    "invalid utf-8": ({"inputs": llm_inputs(b"\xff\xfe caf\xc3")},
                      "input 'text_input' is not valid UTF-8"),
    "token id outside vocabulary": ({"inputs": [_ids([1, 2, 10**9]),
                                                *llm_inputs(None)]},
                                    "outside the vocabulary"),
    "text and ids both": ({"inputs": [_ids([1, 2]), *llm_inputs("Hi")]},
                          "give either input 'text_input' or input 'input_ids', not both"),
    "unknown output": ({"outputs": [grpcclient.InferRequestedOutput("nope")]},
                       f"unexpected inference output 'nope' for model '{MODEL}'"),
    "output asked twice": ({"outputs": [grpcclient.InferRequestedOutput("text_output"),
                                        grpcclient.InferRequestedOutput("text_output")]},
                           "[request id: bad] output 'text_output' already exists in request"),
    "repeated json key": ({"inputs": [*_without(llm_inputs("Hi"), "sampling_parameters"),
                                      tensor("sampling_parameters",
                                             '{"max_tokens": 3, "max_tokens": 300}', "BYTES")]},
                          "input 'sampling_parameters' holds the key 'max_tokens' more than "
                          "once"),
    "streaming with input in output": (
        {"inputs": llm_inputs("Hi", exclude_input_in_output=False)},
        "When streaming, `exclude_input_in_output` = False is not allowed."),
}


@pytest.mark.parametrize("case", list(CASES))
def test_bad_request_then_good_request_on_one_stream(server: ServerHandle, case: str) -> None:
    overrides, message = CASES[case]
    client = grpcclient.InferenceServerClient(server.grpc_url)
    got: queue.Queue[tuple[Any, Any]] = queue.Queue()
    client.start_stream(callback=lambda result, error: got.put((result, error)))
    bad = {"model_name": MODEL, "inputs": llm_inputs("Hi"), **overrides}
    client.async_stream_infer(bad.pop("model_name"), bad.pop("inputs"), request_id="bad",
                              **bad)
    _result, error = got.get(timeout=60)
    assert error is not None, f"{case}: no error"
    assert message in error.message(), error.message()
    client.async_stream_infer(MODEL, llm_inputs("Hello there", 3), request_id="good")
    while True:
        result, error = got.get(timeout=60)
        assert error is None, error
        assert result.get_response().id == "good"
        if is_final(result):
            break
    client.stop_stream()
    client.close()


def test_engine_holds_nothing_after_bad_requests(server: ServerHandle) -> None:
    key = f'{{model="{MODEL}",version="1"}}'
    deadline = time.monotonic() + 60
    while True:
        samples = server.metrics()
        idle = (samples["pagedserve_kv_blocks_used" + key] == 0
                and samples["pagedserve_requests_running" + key] == 0
                and samples["pagedserve_requests_waiting" + key] == 0)
        if idle:
            break
        assert time.monotonic() < deadline, samples
        time.sleep(0.1)
    assert samples[f"nv_inference_request_failure{key}"] >= 1
