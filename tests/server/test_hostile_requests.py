"""Hostile requests: each gets its own clear error, and nobody else's stream notices.

The acceptance test of fault isolation runs 8 long greedy streams, and while they generate it
sends every poison class (values that once failed the whole batched step, JSON that once
answered "internal error", oversized fields) and a ``hypothesis`` fuzz over sampling-parameter
JSON. The good streams must end exactly as they do alone.
"""

from __future__ import annotations

import json
import queue
import threading
import time
from collections.abc import Iterator
from typing import Any

import numpy as np
import pytest
import tritonclient.grpc as grpcclient
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from tritonclient.utils import InferenceServerException

from pagedserve.protocol import grpc_service_pb2 as pb
from pagedserve.server.wire import check_request_id, request_parameters
from pagedserve.tensors import TensorError, parse_request
from tests.server.conftest import MODEL, ServerHandle, is_final, llm_inputs, tensor, text_of

GOOD_PROMPTS = ["The capital of France is", "def fibonacci(n):", "Once upon a time,",
                "List three colors:", "The quick brown fox", "Hello, my name is",
                "1, 2, 3, 4, 5,", "The three primary colors are"]
GOOD_TOKENS = 120


# ---- client errors, unit level --------------------------------------------------------------


def _sampling(text: str) -> dict[str, np.ndarray]:
    return {"text_input": np.array([b"Hi"], dtype=np.object_),
            "sampling_parameters": np.array([text.encode()], dtype=np.object_)}


@pytest.mark.parametrize(("text", "message"), [
    ("[" * 100_000, "'sampling_parameters' is nested too deeply"),
    ('{"stop": ' + "[" * 50_000 + "]" * 50_000 + "}", "nested too deeply"),
    ('{"max_tokens": 1' + "0" * 5000 + "}", "max_tokens must be an integer"),
    ('{"temperature": 1' + "0" * 5000 + "}", "temperature must be a number"),
    ('{"top_k": 1' + "0" * 30 + "}", "top_k must fit a 64-bit integer"),
    ('{"top_p": 1e999}', "top_p must be finite"),
    ('{"temperature": NaN}', "temperature must be finite"),
    ('{"max_tokens": ""}', "'max_tokens' must be of type int"),
    ('{"stop": "' + "x" * 100_000 + '"}', "stop must hold strings of at most"),
])
def test_malformed_sampling_json_names_the_field(text: str, message: str) -> None:
    with pytest.raises(TensorError, match=r"sampling.parameter|SamplingParams") as info:
        parse_request(_sampling(text))
    assert message in str(info.value)
    assert len(str(info.value)) < 500  # the hostile value is never echoed whole


def test_parameter_without_a_value_is_an_error() -> None:
    request = pb.ModelInferRequest(id="r1")
    request.parameters["max_tokens"].SetInParent()  # sent, but with no value
    with pytest.raises(TensorError, match="parameter 'max_tokens' has no value"):
        request_parameters(request)


def test_oversized_request_id_is_refused_and_not_echoed() -> None:
    request = pb.ModelInferRequest(id="x" * 5000)
    with pytest.raises(TensorError, match="request id is 5000 characters long") as info:
        check_request_id(request)
    assert "xxxx" not in str(info.value)


# ---- fault isolation end to end -------------------------------------------------------------


class GoodStreams:
    """Long greedy requests on one stream, collected on the client's callback thread."""

    def __init__(self, server: ServerHandle, prompts: list[str] = GOOD_PROMPTS) -> None:
        self.client = grpcclient.InferenceServerClient(server.grpc_url)
        self.prompts = {f"good{i}": prompt for i, prompt in enumerate(prompts)}
        self.texts: dict[str, list[str]] = {rid: [] for rid in self.prompts}
        self.responses = 0  # all requests together
        self.finish: dict[str, str] = {}
        self.errors: list[str] = []
        self.first_token = threading.Event()
        self.done = threading.Event()

    def _on_result(self, result: Any, error: Any) -> None:
        self.responses += 1
        if error is not None:
            self.errors.append(error.message())
            self.done.set()
            return
        request_id = result.get_response().id
        self.texts[request_id].append(text_of(result))
        self.first_token.set()
        if is_final(result):
            self.finish[request_id] = str(result.as_numpy("finish_reason")[0].decode())
            if len(self.finish) == len(self.texts):
                self.done.set()

    def run(self) -> None:
        self.client.start_stream(callback=self._on_result)
        for request_id, prompt in self.prompts.items():
            self.client.async_stream_infer(
                MODEL, llm_inputs(prompt, GOOD_TOKENS, params={"ignore_eos": True},
                                  return_finish_reason=True), request_id=request_id)

    def wait(self) -> dict[str, str]:
        assert self.done.wait(300), "the good streams did not finish"
        self.client.stop_stream()
        self.client.close()
        assert not self.errors, self.errors
        assert self.finish == {rid: "length" for rid in self.texts}
        return {rid: "".join(parts) for rid, parts in self.texts.items()}


class PoisonStream:
    """Sends one request at a time on its own stream; each ends in an error or a final."""

    def __init__(self, server: ServerHandle) -> None:
        self.client = grpcclient.InferenceServerClient(server.grpc_url)
        self.results: queue.Queue[tuple[Any, Any]] = queue.Queue()
        self.client.start_stream(callback=lambda result, error: self.results.put((result, error)))
        self.sent = 0

    def send(self, inputs: list[Any], request_id: str | None = None, model: str = MODEL) -> Any:
        """The error (``tritonclient``'s exception), or ``None`` when the request ran to its
        final response."""
        self.sent += 1
        self.client.async_stream_infer(model, inputs, request_id=request_id or f"p{self.sent}")
        while True:
            result, error = self.results.get(timeout=120)
            if error is not None:
                message = str(error.message())
                assert message and not message.startswith("internal error"), message
                assert "engine step failed" not in message, message
                return error
            if is_final(result):
                return None

    def close(self) -> None:
        self.client.stop_stream()
        self.client.close()


def _params_tensor(values: Any) -> Any:
    return tensor("sampling_parameters", json.dumps(values), "BYTES")


def _with_sampling(prompt: str, text: str) -> list[Any]:
    inputs = [i for i in llm_inputs(prompt) if i.name() != "sampling_parameters"]
    return [*inputs, tensor("sampling_parameters", text, "BYTES")]


# Every class that used to fail the batched step or answer "internal error", and amplifiers.
POISONS: dict[str, tuple[list[Any], str, str | None]] = {
    "logprobs above the vocabulary": (
        llm_inputs("Hi", params={"logprobs": 10**6}), "logprobs", None),
    "logprobs above max_logprobs": (llm_inputs("Hi", params={"logprobs": 21}), "logprobs", None),
    "top_k beyond 64 bits": (llm_inputs("Hi", params={"top_k": 2**64}), "top_k", None),
    "stop token outside the vocabulary": (
        llm_inputs("Hi", params={"stop_token_ids": [10**6], "min_tokens": 2}),
        "stop_token_ids", None),
    "nested JSON": (_with_sampling("Hi", "[" * 100_000), "nested too deeply", None),
    "thousands of digits": (_with_sampling("Hi", '{"max_tokens": 1' + "0" * 5000 + "}"),
                            "max_tokens", None),
    "empty value": (_with_sampling("Hi", '{"max_tokens": ""}'), "max_tokens", None),
    "huge request id": (llm_inputs("Hi"), "request id is", "i" * 100_000),
    "prompt that cannot fit": (llm_inputs("word " * 300_000), "fits the maximum context", None),
    "ids that cannot fit": ([tensor("input_ids", list(range(5000)), "INT64"),
                             *llm_inputs(None)], "maximum context length", None),
    "many stop strings": (llm_inputs("Hi", params={"stop": ["a"] * 1000}), "stop", None),
}

_JSON_SCALARS = st.one_of(
    st.none(), st.booleans(), st.text(max_size=20),
    st.integers(min_value=-(2**80), max_value=2**80),
    st.integers(min_value=-3, max_value=60_000),
    st.floats(allow_nan=True, allow_infinity=True))
_JSON = st.recursive(_JSON_SCALARS, lambda inner: st.one_of(
    st.lists(inner, max_size=4), st.dictionaries(st.text(max_size=8), inner, max_size=4)),
    max_leaves=12)
_FIELDS = ["n", "temperature", "top_k", "top_p", "min_p", "repetition_penalty",
           "presence_penalty", "frequency_penalty", "seed", "min_tokens", "stop",
           "stop_token_ids", "include_stop_str_in_output", "ignore_eos", "logprobs",
           "skip_special_tokens", "beam_width", "length_penalty", "early_stopping", "bogus"]
# max_tokens is either invalid or small, so a valid fuzzed request stays short (null is "up to
# the context", and with ignore_eos a valid request ran for minutes).
_MAX_TOKENS = st.one_of(st.integers(min_value=1, max_value=4), st.integers(max_value=0),
                        st.just(2**70), st.text(max_size=5), st.floats())
FUZZED = st.builds(lambda fields, max_tokens: {**fields, "max_tokens": max_tokens},
                   st.dictionaries(st.sampled_from(_FIELDS), _JSON, max_size=5), _MAX_TOKENS)


@pytest.fixture(scope="module")
def baseline(server: ServerHandle) -> dict[str, str]:
    """The good streams' texts with nothing else on the server."""
    good = GoodStreams(server)
    good.run()
    return good.wait()


@pytest.mark.slow
def test_poison_requests_never_hurt_running_streams(server: ServerHandle,
                                                    baseline: dict[str, str]) -> None:
    log_before = len(server.log())
    good = GoodStreams(server)
    good.run()
    assert good.first_token.wait(120)
    poison = PoisonStream(server)
    for name, (inputs, message, request_id) in POISONS.items():
        error = poison.send(inputs, request_id)
        assert error is not None and message in error.message(), (name, error)
    assert not good.done.is_set(), "the good streams ended before the poison was sent"

    @settings(max_examples=60, deadline=None, derandomize=True,
              suppress_health_check=list(HealthCheck))
    @given(FUZZED)
    def fuzz(values: dict[str, Any]) -> None:
        poison.send([i for i in llm_inputs("Hi") if i.name() != "sampling_parameters"]
                    + [_params_tensor(values)])

    fuzz()
    poison.close()
    assert good.wait() == baseline
    log = server.log()[log_before:]
    assert "engine step failed" not in log and "one at a time" not in log, log[-3000:]


# ---- huge prompts: refused fast, memory bounded, other streams unaffected --------------------


def _rss_peak_kb(pid: int) -> int:
    with open(f"/proc/{pid}/status") as status:
        for line in status:
            if line.startswith("VmHWM:"):
                return int(line.split()[1])
    raise AssertionError("no VmHWM")


@pytest.fixture(scope="module")
def fresh_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[ServerHandle]:
    """A server of its own, so its peak memory reflects this test alone."""
    from tests.server.conftest import DEFAULT_REPOSITORY, start_server

    handle = start_server(DEFAULT_REPOSITORY)
    yield handle
    handle.stop()


def _send_alone(server: ServerHandle, inputs: list[Any], model: str) -> Any:
    """The error of one request on a stream of its own (a refusal may end a stream)."""
    stream = PoisonStream(server)
    error = stream.send(inputs, model=model)
    stream.close()
    return error


@pytest.mark.slow
def test_huge_prompts_are_refused_with_bounded_memory(fresh_server: ServerHandle) -> None:
    """A prompt too long for the context is refused by its length (before it is tokenized:
    tests/test_fault_isolation.py), one past the message cap by gRPC; memory stays bounded and
    a stream running meanwhile goes on to its last token. How long each refusal takes is the
    benchmarks' to record, not a test's."""
    warm = PoisonStream(fresh_server)
    assert warm.send(llm_inputs("Warm up", 4)) is None  # first-request allocations are done
    warm.close()
    peak_before = _rss_peak_kb(fresh_server.process.pid)
    good = GoodStreams(fresh_server, GOOD_PROMPTS[:1])
    good.run()
    assert good.first_token.wait(120)
    for size_mb, message in ((10, "fits the maximum context"), (100, "larger than max")):
        inputs = llm_inputs("x" * (size_mb * 2**20))
        # The same bytes for a model that does not exist: refused for the name, or by the cap.
        unknown = _send_alone(fresh_server, inputs, "no_such_model")
        error = _send_alone(fresh_server, inputs, MODEL)
        assert unknown is not None, size_mb
        assert error is not None and message in error.message(), (size_mb, error)
        if size_mb == 100:  # refused by the message cap, before it is parsed
            assert error.status() == "StatusCode.RESOURCE_EXHAUSTED", error.status()
            assert unknown.status() == "StatusCode.RESOURCE_EXHAUSTED", unknown.status()
        else:
            assert "unknown model" in unknown.message().lower(), unknown.message()
    assert not good.done.is_set(), "the stream ended before the huge prompts were sent"
    good.wait()
    growth_mb = (_rss_peak_kb(fresh_server.process.pid) - peak_before) / 1024
    assert growth_mb < 100, growth_mb
    assert good.responses >= GOOD_TOKENS


# ---- a bounded queue: overload is refused at once, with RESOURCE_EXHAUSTED ------------------


@pytest.fixture(scope="module")
def one_slot_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[ServerHandle]:
    """A unary (not decoupled) model that takes one request at a time and queues none."""
    from tests.server.conftest import add_default_model, start_server

    root = tmp_path_factory.mktemp("one-slot")
    add_default_model(root, "one", {"model": "default", "max_model_len": 512,
                                    "kv_cache_memory_bytes": 16 * 2**20, "max_num_seqs": 1,
                                    "max_queue_size": 0}, decoupled=False)
    handle = start_server(root)
    yield handle
    handle.stop()


@pytest.mark.slow
def test_requests_beyond_the_queue_get_resource_exhausted(one_slot_server: ServerHandle) -> None:
    client = grpcclient.InferenceServerClient(one_slot_server.grpc_url)
    done: queue.Queue[tuple[Any, Any]] = queue.Queue()
    client.async_infer("one", llm_inputs("Count to a thousand:", 120, stream=False,
                                         params={"ignore_eos": True}),
                       callback=lambda result, error: done.put((result, error)))
    key = '{engine="1",model_name="one"}'
    deadline = time.monotonic() + 60
    while one_slot_server.metrics().get(f"vllm:num_requests_running{key}", 0) < 1:
        assert time.monotonic() < deadline, "the first request never started"
        time.sleep(0.05)
    with pytest.raises(InferenceServerException) as refused:
        client.infer("one", llm_inputs("Hi", 2, stream=False))
    assert refused.value.status() == "StatusCode.RESOURCE_EXHAUSTED"
    assert "max_queue_size" in refused.value.message()
    _result, error = done.get(timeout=300)
    assert error is None, error
    assert client.infer("one", llm_inputs("Hi", 2, stream=False)) is not None
    client.close()
