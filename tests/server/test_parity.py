"""Triton's own behaviours, checked against real Triton and against our server alike.

Every test here runs once per server kind (``target`` fixture): **triton** is the real Triton
2.51 binary of the ``nvidia-pytriton`` wheel serving the decoupled echo model ``echo_vllm`` of
``tests/triton_ref.py`` (the tensors of Triton's vLLM backend); **pagedserve** is our server
(``python -m pagedserve serve``) on the default ``model_repository/``. Both are driven only through
the official ``tritonclient.grpc``. The tests assert protocol behaviour, never generated text:
the echo model echoes, ours generates. ``docs/triton-behaviour.md`` records what Triton answered
and marks these behaviours **[parity]**.

Behaviours checked both ways:

* health: ServerLive, ServerReady, ModelReady (true for the model; *false, not an error* for an
  unknown model or version);
* ServerMetadata shape (name, version, extensions);
* ModelMetadata of a vLLM-style model: the vLLM backend's input/output names, datatypes, shapes,
  optional inputs as in ModelConfig, versions; unknown model and unknown version give NOT_FOUND
  with Triton's wording; a non-numeric version gives INVALID_ARGUMENT;
* ModelConfig: name, ``max_batch_size`` 0, decoupled transaction policy, inputs/outputs with the
  metadata's names, optional flags (``text_input`` aside: required in Triton's vLLM backend,
  optional in ours beside ``input_ids``); NOT_FOUND wording for unknown model and version;
* RepositoryIndex: the model listed READY with its version; ``repository_name`` → UNIMPLEMENTED
  "'repository_name' specification is not supported";
* ModelStatistics: entry shape, counts that grow by the requests made (inference_count,
  execution_count, success/queue/compute_input/compute_infer/compute_output counts, durations,
  last_inference); compute counts equal in every snapshot taken while requests run (what
  perf_analyzer needs); INVALID_ARGUMENT wording
  for unknown model and version;
* ModelInfer on a decoupled model → UNIMPLEMENTED "ModelInfer RPC doesn't support models with
  decoupled transaction policy" (after the version lookup, before input validation); ModelInfer
  on an unknown model → NOT_FOUND;
* ModelStreamInfer: ``id``, ``model_name``, ``model_version`` echoed on every response;
  ``triton_final_response`` on every response, exactly one true and it is the last; with
  ``triton_enable_empty_final_response`` the request still ends with one final response and
  nothing follows it; responses of several requests in flight on one stream matched by id;
  ``max_tokens`` from request parameters with ``return_finish_reason`` /
  ``return_num_output_tokens`` (finish reason ``length``, output count = max_tokens);
  requested-outputs filter;
* stream errors as ``error_message`` with Triton's wording, the stream staying open and answering
  the next request: unknown model, unknown version, no inputs (the error names ``text_input``),
  unexpected input, wrong datatype, wrong shape, ``triton_enable_empty_final_response`` not a
  bool, and the vLLM backend's ``exclude_input_in_output=false`` with ``stream=true``; invalid
  ``sampling_parameters`` JSON is an error (wording free);
* reserved ``triton_`` request parameters refused with Triton's wording;
* LogSettings: the six settings with their types; an update echoes the new value; unknown keys
  ignored. TraceSetting: Triton's six keys; ``trace_rate`` update echoed;
* shared memory: registering a system region that does not exist fails.
"""

from __future__ import annotations

import contextlib
import json
import queue
import tempfile
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import grpc
import numpy as np
import pytest
import tritonclient.grpc as grpcclient
from tritonclient.grpc import service_pb2
from tritonclient.utils import InferenceServerException

from pagedserve.python_backend.host import wait_ready
from tests.server.conftest import MODEL, ServerHandle
from tests.triton_ref import make_echo_repository, running_triton

pytestmark = pytest.mark.slow

PROMPT = "The quick brown fox jumps over the lazy dog"
# vLLM backend's tensors: (name, datatype, shape) as ModelMetadata reports them.
VLLM_INPUTS = {"text_input": ("BYTES", [1]), "stream": ("BOOL", [1]),
               "sampling_parameters": ("BYTES", [1]), "exclude_input_in_output": ("BOOL", [1]),
               "return_finish_reason": ("BOOL", [1]), "return_cumulative_logprob": ("BOOL", [1]),
               "return_logprobs": ("BOOL", [1]), "return_num_input_tokens": ("BOOL", [1]),
               "return_num_output_tokens": ("BOOL", [1])}
VLLM_OUTPUTS = {"text_output": ("BYTES", [-1]), "finish_reason": ("BYTES", [-1]),
                "cumulative_logprob": ("FP32", [-1]), "logprobs": ("BYTES", [-1]),
                "num_input_tokens": ("UINT32", [1]), "num_output_tokens": ("UINT32", [-1])}
STREAM_TIMEOUT = 120.0


@dataclass(frozen=True)
class Target:
    """A running server and its decoupled vLLM-style model."""

    kind: str
    url: str
    model: str
    version: str


@pytest.fixture(scope="module")
def triton_target() -> Iterator[Target]:
    with tempfile.TemporaryDirectory() as tmp, \
            running_triton(make_echo_repository(Path(tmp), ["echo_vllm"])) as triton:
        yield Target("triton", triton.grpc_url, "echo_vllm", "1")


@pytest.fixture(scope="module")
def pagedserve_target(server: ServerHandle) -> Target:
    wait_ready(server.grpc_url)
    return Target("pagedserve", server.grpc_url, MODEL, "1")


@pytest.fixture(params=["triton", "pagedserve"])
def target(request: pytest.FixtureRequest) -> Target:
    return request.getfixturevalue(f"{request.param}_target")


@pytest.fixture
def client(target: Target) -> Iterator[grpcclient.InferenceServerClient]:
    c = grpcclient.InferenceServerClient(target.url)
    yield c
    c.close()


# ---------------------------------------------------------------------------- helpers


def tensor(name: str, value: Any, datatype: str) -> grpcclient.InferInput:
    """A one-element input tensor (BYTES values given as str)."""
    if datatype == "BYTES":
        array = np.array([value.encode() if isinstance(value, str) else value], dtype=np.object_)
    else:
        array = np.array([value], dtype={"BOOL": bool, "INT32": np.int32}[datatype])
    t = grpcclient.InferInput(name, list(array.shape), datatype)
    t.set_data_from_numpy(array)
    return t


def stream_inputs(prompt: str = PROMPT, max_tokens: int | None = 4,
                  **flags: bool) -> list[grpcclient.InferInput]:
    """A streaming vLLM-style request (greedy; prompt excluded from the output)."""
    inputs = [tensor("text_input", prompt, "BYTES"), tensor("stream", True, "BOOL"),
              tensor("exclude_input_in_output", True, "BOOL")]
    if max_tokens is not None:
        params = json.dumps({"max_tokens": max_tokens, "temperature": 0})
        inputs.append(tensor("sampling_parameters", params, "BYTES"))
    inputs += [tensor(name, value, "BOOL") for name, value in flags.items()]
    return inputs


class Stream:
    """One ModelStreamInfer call: every callback lands in a queue, read back per request."""

    def __init__(self, client: grpcclient.InferenceServerClient) -> None:
        self.client = client
        self.events: queue.Queue[tuple[Any, Any]] = queue.Queue()
        client.start_stream(callback=lambda result, error: self.events.put((result, error)))

    def send(self, model: str, inputs: list, request_id: str, **kwargs: Any) -> None:
        self.client.async_stream_infer(model, inputs, request_id=request_id, **kwargs)

    def next(self) -> tuple[Any, Any]:
        return self.events.get(timeout=STREAM_TIMEOUT)

    def until_final(self, request_id: str) -> list[service_pb2.ModelInferResponse]:
        """Responses up to and including ``request_id``'s final one; fails on any error."""
        got = []
        while True:
            result, error = self.next()
            assert error is None, f"unexpected stream error: {error}"
            response = result.get_response()
            got.append(response)
            if response.id == request_id and is_final(response):
                return got

    def close(self) -> None:
        self.client.stop_stream()


@pytest.fixture
def stream(client: grpcclient.InferenceServerClient) -> Iterator[Stream]:
    s = Stream(client)
    yield s
    s.close()


def is_final(response: service_pb2.ModelInferResponse) -> bool:
    return response.parameters["triton_final_response"].bool_param


def error_of(call: Any) -> InferenceServerException:
    with pytest.raises(InferenceServerException) as info:
        call()
    return info.value


def unknown(model: str, version: str | None = None) -> str:
    """Triton's NOT_FOUND wording."""
    if version is None:
        return f"Request for unknown model: '{model}' is not found"
    return f"Request for unknown model: '{model}' version {version} is not found"


def stream_error(stream: Stream, target: Target, inputs: list, expected: str | None,
                 **kwargs: Any) -> None:
    """A bad request gets ``error_message`` (``expected``, when given); the stream stays open
    and a good request after it completes."""
    stream.send(kwargs.pop("model", target.model), inputs, "bad", **kwargs)
    result, error = stream.next()
    assert result is None and error is not None
    if expected is not None:
        assert error.message() == expected
    stream.send(target.model, stream_inputs(max_tokens=2), "good")
    responses = stream.until_final("good")
    assert {r.id for r in responses} == {"good"}


# ---------------------------------------------------------------------------- health


def test_health_and_readiness(client, target):
    assert client.is_server_live()
    assert client.is_server_ready()
    assert client.is_model_ready(target.model)
    assert client.is_model_ready(target.model, target.version)
    # Unknown models and versions are "not ready", not errors.
    assert client.is_model_ready("no_such_model") is False
    assert client.is_model_ready(target.model, "77") is False


def test_server_metadata_shape(client):
    meta = client.get_server_metadata()
    assert meta.name and meta.version
    assert len(meta.extensions) == len(set(meta.extensions))
    # What tritonclient and perf_analyzer rely on.
    for ext in ("model_repository", "model_configuration", "binary_tensor_data", "parameters",
                "statistics"):
        assert ext in meta.extensions


# ---------------------------------------------------------------------------- metadata / config


def test_model_metadata_has_the_vllm_backend_tensors(client, target):
    meta = client.get_model_metadata(target.model)
    assert meta.name == target.model
    assert target.version in meta.versions
    assert meta.platform
    inputs = {t.name: (t.datatype, list(t.shape)) for t in meta.inputs}
    outputs = {t.name: (t.datatype, list(t.shape)) for t in meta.outputs}
    for name, spec in VLLM_INPUTS.items():
        assert inputs[name] == spec, name
    for name, spec in VLLM_OUTPUTS.items():
        assert outputs[name] == spec, name
    assert client.get_model_metadata(target.model, target.version).name == target.model


def test_model_config_matches_metadata(client, target):
    config = client.get_model_config(target.model).config
    meta = client.get_model_metadata(target.model)
    assert config.name == target.model
    assert config.max_batch_size == 0
    assert config.model_transaction_policy.decoupled
    # perf_analyzer needs every config tensor in the metadata, in the same order.
    assert [i.name for i in config.input] == [i.name for i in meta.inputs]
    assert [o.name for o in config.output] == [o.name for o in meta.outputs]
    optional = {i.name: i.optional for i in config.input}
    # text_input is required in Triton's vLLM backend; ours makes it optional so a request may
    # carry input_ids instead (it then rejects a request with neither).
    assert all(optional[name] for name in VLLM_INPUTS if name != "text_input")


@pytest.mark.parametrize("rpc", ["get_model_metadata", "get_model_config"])
def test_unknown_model_or_version_is_not_found(client, target, rpc):
    err = error_of(lambda: getattr(client, rpc)("no_such_model"))
    assert (err.status(), err.message()) == ("StatusCode.NOT_FOUND", unknown("no_such_model"))
    err = error_of(lambda: getattr(client, rpc)(target.model, "77"))
    assert (err.status(), err.message()) == ("StatusCode.NOT_FOUND", unknown(target.model, "77"))
    err = error_of(lambda: getattr(client, rpc)(target.model, "abc"))
    assert err.status() == "StatusCode.INVALID_ARGUMENT"


# ---------------------------------------------------------------------------- repository


def test_repository_index(client, target):
    index = client.get_model_repository_index()
    entries = {(m.name, m.version): m.state for m in index.models}
    assert entries[(target.model, target.version)] == "READY"
    with pytest.raises(grpc.RpcError) as info:
        client._client_stub.RepositoryIndex(
            service_pb2.RepositoryIndexRequest(repository_name="other"))
    assert info.value.code() == grpc.StatusCode.UNIMPLEMENTED
    assert info.value.details() == "'repository_name' specification is not supported"


# ---------------------------------------------------------------------------- statistics


def _stats(client, model: str) -> Any:
    (entry,) = client.get_inference_statistics(model).model_stats
    return entry


def test_statistics_count_requests(client, target, stream):
    before = _stats(client, target.model)
    assert before.name == target.model and before.version == target.version
    for i in range(2):
        stream.send(target.model, stream_inputs(max_tokens=2), f"s{i}")
        stream.until_final(f"s{i}")
    # Statistics are recorded when the request is released, just after its final response.
    deadline = time.monotonic() + 60
    while True:
        after = _stats(client, target.model)
        if after.inference_count - before.inference_count >= 2 or time.monotonic() > deadline:
            break
        time.sleep(0.05)
    assert after.inference_count - before.inference_count == 2
    assert after.execution_count - before.execution_count >= 1
    s0, s1 = before.inference_stats, after.inference_stats
    assert s1.success.count - s0.success.count == 2
    assert s1.queue.count - s0.queue.count == 2
    assert s1.success.ns > s0.success.ns
    # perf_analyzer aborts ("Server side statistics compute counts must be the same") unless a
    # request's compute_input, compute_infer and compute_output are counted together.
    for name in ("compute_input", "compute_infer", "compute_output"):
        assert getattr(s1, name).count - getattr(s0, name).count == 2, name
    assert after.last_inference >= int(time.time() * 1000) - 120_000
    every = client.get_inference_statistics().model_stats
    assert (target.model, target.version) in {(m.name, m.version) for m in every}


def test_statistics_compute_counts_agree_while_requests_run(client, target, stream):
    """Triton records a request's statistics all at once when it is released, so any snapshot
    (perf_analyzer takes them mid-run) has equal compute_input/infer/output counts."""
    ids = [f"c{i}" for i in range(4)]
    for rid in ids:
        stream.send(target.model, stream_inputs(max_tokens=16), rid)
    finals: set[str] = set()
    snapshots = 0
    while finals != set(ids):
        stats = _stats(client, target.model).inference_stats
        snapshots += 1
        counts = {stats.compute_input.count, stats.compute_infer.count,
                  stats.compute_output.count}
        assert len(counts) == 1, f"snapshot {snapshots}: {stats}"
        with contextlib.suppress(queue.Empty):
            while True:
                result, error = stream.events.get(timeout=0.01)
                assert error is None
                if is_final(result.get_response()):
                    finals.add(result.get_response().id)


def test_statistics_of_unknown_model_or_version(client, target):
    err = error_of(lambda: client.get_inference_statistics("no_such_model"))
    assert (err.status(), err.message()) == (
        "StatusCode.INVALID_ARGUMENT", "requested model 'no_such_model' is not available")
    err = error_of(lambda: client.get_inference_statistics(target.model, "77"))
    assert (err.status(), err.message()) == (
        "StatusCode.INVALID_ARGUMENT",
        f"requested model version is not available for model '{target.model}'")


# ---------------------------------------------------------------------------- unary inference


def test_model_infer_on_decoupled_model_is_unimplemented(client, target):
    err = error_of(lambda: client.infer(target.model, stream_inputs()))
    assert err.status() == "StatusCode.UNIMPLEMENTED"
    assert err.message() == ("ModelInfer RPC doesn't support models with decoupled transaction "
                             "policy")
    err = error_of(lambda: client.infer("no_such_model", stream_inputs()))
    assert (err.status(), err.message()) == ("StatusCode.NOT_FOUND", unknown("no_such_model"))
    # The version lookup comes first, input validation after the decoupled check.
    err = error_of(lambda: client.infer(target.model, stream_inputs(), model_version="77"))
    assert (err.status(), err.message()) == ("StatusCode.NOT_FOUND", unknown(target.model, "77"))
    err = error_of(lambda: client.infer(target.model, [tensor("bogus", True, "BOOL")]))
    assert err.status() == "StatusCode.UNIMPLEMENTED"


def test_reserved_parameters_are_refused(stream, target):
    stream_error(stream, target, stream_inputs(), "parameter keys starting with 'triton_' are "
                 "reserved for Triton usage. Only the following keys starting with 'triton_' "
                 "are allowed: triton_enable_empty_final_response",
                 parameters={"triton_x": True})


def _raw_request(model: str, parameters: dict[str, bool]) -> service_pb2.ModelInferRequest:
    request = service_pb2.ModelInferRequest(model_name=model, id="raw")
    text = request.inputs.add(name="text_input", datatype="BYTES", shape=[1])
    text.contents.bytes_contents.append(PROMPT.encode())
    for key, value in parameters.items():
        request.parameters[key].bool_param = value
    return request


# ---------------------------------------------------------------------------- streaming


def test_stream_final_flag_and_echoed_fields(stream, target):
    stream.send(target.model, stream_inputs(max_tokens=4), "req-1")
    responses = stream.until_final("req-1")
    assert len(responses) >= 2
    for r in responses:
        assert r.id == "req-1"
        assert r.model_name == target.model
        assert r.model_version == target.version
        assert "triton_final_response" in r.parameters
    assert [is_final(r) for r in responses] == [False] * (len(responses) - 1) + [True]
    # One raw entry per output, each a BYTES element with its length prefix.
    for r in responses:
        assert len(r.raw_output_contents) == len(r.outputs)


def test_empty_final_response_flag_still_ends_with_one_final(stream, target):
    stream.send(target.model, stream_inputs(max_tokens=3), "e1",
                enable_empty_final_response=True)
    responses = stream.until_final("e1")
    assert sum(is_final(r) for r in responses) == 1
    final = responses[-1]
    assert final.id == "e1" and final.model_name == target.model
    # An empty final (no outputs) is allowed; data responses before it are never final.
    assert all(r.outputs for r in responses[:-1])
    # Nothing more for e1: a follow-up request is the next thing on the stream.
    stream.send(target.model, stream_inputs(max_tokens=1), "e2")
    assert {r.id for r in stream.until_final("e2")} == {"e2"}


def test_many_requests_in_flight_on_one_stream(stream, target):
    ids = [f"m{i}" for i in range(6)]
    for rid in ids:
        stream.send(target.model, stream_inputs(max_tokens=3), rid)
    finals: set[str] = set()
    while finals != set(ids):
        result, error = stream.next()
        assert error is None
        response = result.get_response()
        assert response.id in ids and response.id not in finals
        if is_final(response):
            finals.add(response.id)


def test_max_tokens_from_request_parameters(stream, target):
    inputs = stream_inputs(PROMPT, max_tokens=None, return_finish_reason=True,
                           return_num_output_tokens=True)
    stream.send(target.model, inputs, "p1", parameters={"max_tokens": 3, "temperature": 0})
    responses = stream.until_final("p1")
    results = [grpcclient.InferResult(r) for r in responses]
    assert sum(int(r.as_numpy("num_output_tokens").sum()) for r in results) == 3
    assert results[-1].as_numpy("finish_reason").tolist() == [b"length"]


def test_requested_outputs_filter(stream, target):
    inputs = stream_inputs(max_tokens=2, return_finish_reason=True)
    stream.send(target.model, inputs, "f1", outputs=[grpcclient.InferRequestedOutput(
        "finish_reason")])
    for r in stream.until_final("f1"):
        assert [o.name for o in r.outputs] == ["finish_reason"]


# ---------------------------------------------------------------------------- stream errors


def test_stream_error_unknown_model(stream, target):
    stream_error(stream, target, stream_inputs(), unknown("no_such_model"),
                 model="no_such_model")


def test_stream_error_unknown_version(stream, target):
    stream_error(stream, target, stream_inputs(), unknown(target.model, "77"),
                 model_version="77")


def test_stream_error_no_inputs(stream, target):
    stream.send(target.model, [], "bad")
    _, error = stream.next()
    # Triton: "[request id: bad] expected number of inputs between 1 and 9 but got 0 inputs
    # ... missing required input(s) ['text_input'] ..."; ours, where text_input is optional
    # beside input_ids, names both. Both name the missing input.
    assert "'text_input'" in error.message()
    stream.send(target.model, stream_inputs(max_tokens=1), "good")
    stream.until_final("good")


def test_stream_error_unexpected_input(stream, target):
    stream_error(stream, target, [*stream_inputs(), tensor("bogus", True, "BOOL")],
                 f"unexpected inference input 'bogus' for model '{target.model}'")


def test_stream_error_wrong_datatype(stream, target):
    stream_error(stream, target, [tensor("text_input", 1, "INT32")],
                 f"[request id: bad] inference input 'text_input' data-type is 'INT32', but "
                 f"model '{target.model}' expects 'BYTES'")


def test_stream_error_wrong_shape(stream, target):
    two = grpcclient.InferInput("text_input", [2], "BYTES")
    two.set_data_from_numpy(np.array([b"a", b"b"], dtype=np.object_))
    stream_error(stream, target, [two],
                 f"[request id: bad] unexpected shape for input 'text_input' for model "
                 f"'{target.model}'. Expected [1], got [2]. ")


def test_stream_error_exclude_input_false_while_streaming(stream, target):
    inputs = [tensor("text_input", PROMPT, "BYTES"), tensor("stream", True, "BOOL"),
              tensor("exclude_input_in_output", False, "BOOL")]
    stream_error(stream, target, inputs, "Error generating stream: When streaming, "
                 "`exclude_input_in_output` = False is not allowed.")


def test_stream_error_invalid_sampling_json(stream, target):
    inputs = [*stream_inputs(max_tokens=None), tensor("sampling_parameters", "{bad", "BYTES")]
    stream_error(stream, target, inputs, None)


def test_stream_error_empty_final_flag_not_bool(client, target):
    """Sent on a raw stream: tritonclient only ever sends this flag as a bool."""
    request = _raw_request(target.model, {})
    request.parameters["triton_enable_empty_final_response"].int64_param = 1
    good = _raw_request(target.model, {})
    good.id = "good"
    for name, value in (("stream", True), ("exclude_input_in_output", True)):
        t = good.inputs.add(name=name, datatype="BOOL", shape=[1])
        t.contents.bool_contents.append(value)
    responses = client._client_stub.ModelStreamInfer(iter([request, good]),
                                                     timeout=STREAM_TIMEOUT)
    first = next(responses)
    assert first.error_message == ("invalid value type for 'triton_enable_empty_final_response' "
                                   "parameter, expected bool_param.")
    assert first.infer_response.id == "raw"
    for r in responses:
        assert not r.error_message and r.infer_response.id == "good"
        if r.infer_response.parameters["triton_final_response"].bool_param:
            break
    responses.cancel()


# ---------------------------------------------------------------------------- settings


def test_log_settings(client):
    settings = client.get_log_settings().settings
    assert settings["log_verbose_level"].WhichOneof("parameter_choice") == "uint32_param"
    for key in ("log_info", "log_warning", "log_error"):
        assert settings[key].WhichOneof("parameter_choice") == "bool_param"
    for key in ("log_file", "log_format"):
        assert settings[key].WhichOneof("parameter_choice") == "string_param"
    updated = client.update_log_settings({"log_verbose_level": 1, "bogus": True}).settings
    assert updated["log_verbose_level"].uint32_param == 1
    assert "bogus" not in updated
    client.update_log_settings({"log_verbose_level": 0})


def test_trace_settings(client, target):
    keys = {"trace_level", "trace_rate", "trace_count", "log_frequency", "trace_file",
            "trace_mode"}
    assert set(client.get_trace_settings().settings) == keys
    assert set(client.get_trace_settings(target.model).settings) == keys
    updated = client.update_trace_settings(settings={"trace_rate": "7"}).settings
    assert list(updated["trace_rate"].value) == ["7"]
    assert list(updated["trace_level"].value) == ["OFF"]
    client.update_trace_settings(settings={"trace_rate": "1000"})


def test_shared_memory_register_of_missing_region_fails(client):
    err = error_of(lambda: client.register_system_shared_memory(
        "parity-region", "/pagedserve-parity-no-such-key", 16))
    assert err.status() in ("StatusCode.INTERNAL", "StatusCode.UNIMPLEMENTED")
