"""Refused where Triton refuses: ambiguous tensor data, outputs the model lacks, repeated JSON
keys, and configs that name a tensor twice or give the prompt a type it cannot have.

One server in ``explicit`` mode serves a non-decoupled model (so ModelInfer, ModelStreamInfer
and the KServe HTTP door all reach it) beside models whose configs must fail their load. Every
refusal is followed by a request that must succeed: the server serves on.
"""

from __future__ import annotations

import json
import urllib.error
import urllib.request
from collections.abc import Iterator
from typing import Any

import grpc
import numpy as np
import pytest
import tritonclient.grpc as grpcclient
from tritonclient.grpc import service_pb2, service_pb2_grpc
from tritonclient.utils import InferenceServerException

from tests.server.conftest import (
    ServerHandle,
    add_default_model,
    llm_inputs,
    start_server,
    text_of,
)

pytestmark = pytest.mark.slow

UNARY = "unary"
MODEL_JSON = {"model": "default", "max_model_len": 256, "kv_cache_memory_bytes": 16 * 2**20,
              "enforce_eager": True}
_BOOL = 'data_type: TYPE_BOOL, dims: [ 1 ], optional: true'
# Model name -> (config.pbtxt, the load's refusal).
BAD_CONFIGS = {
    "twice_input": (f'input [ {{ name: "stream", {_BOOL} }}, {{ name: "stream", {_BOOL} }} ]',
                    "input 'stream' for model 'twice_input' is declared more than once in "
                    "its configuration"),
    "twice_output": ('output [ { name: "text_output", data_type: TYPE_STRING, dims: [ -1 ] },'
                     ' { name: "text_output", data_type: TYPE_STRING, dims: [ -1 ] } ]',
                     "output 'text_output' for model 'twice_output' is declared more than once "
                     "in its configuration"),
    "int_prompt": ('input [ { name: "text_input", data_type: TYPE_INT32, dims: [ 1 ] } ]',
                   "unable to load model 'int_prompt', configuration expects datatype "
                   "TYPE_INT32 for input 'text_input', model provides TYPE_STRING"),
}


@pytest.fixture(scope="module")
def strict(tmp_path_factory: pytest.TempPathFactory) -> Iterator[ServerHandle]:
    root = tmp_path_factory.mktemp("strict-repo")
    add_default_model(root, UNARY, MODEL_JSON, decoupled=False)
    for name, (text, _) in BAD_CONFIGS.items():
        add_default_model(root, name, MODEL_JSON, config=text)
    handle = start_server(root, "--model-control-mode", "explicit", "--load-model", UNARY)
    yield handle
    assert handle.stop() == 0


@pytest.fixture
def client(strict: ServerHandle) -> Iterator[grpcclient.InferenceServerClient]:
    c = grpcclient.InferenceServerClient(strict.grpc_url)
    yield c
    c.close()


def _good(client: grpcclient.InferenceServerClient) -> None:
    """A good request after a refusal: answered in full."""
    assert text_of(client.infer(UNARY, llm_inputs("Hi", 2, stream=False))).startswith("Hi")


# ---- typed contents beside raw_input_contents ------------------------------------------------


def _bytes_tensor(name: str) -> Any:
    return service_pb2.ModelInferRequest.InferInputTensor(name=name, datatype="BYTES",
                                                           shape=[1])


def _raw(value: bytes) -> bytes:
    return len(value).to_bytes(4, "little") + value


def _mixed_request(request_id: str) -> Any:
    """text_input in typed contents, sampling_parameters in raw_input_contents."""
    request = service_pb2.ModelInferRequest(model_name=UNARY, id=request_id)
    text = _bytes_tensor("text_input")
    text.contents.bytes_contents.append(b"Hi")
    params = _bytes_tensor("sampling_parameters")
    request.inputs.extend([text, params])
    request.raw_input_contents.append(_raw(json.dumps({"max_tokens": 2}).encode()))
    return request


def _raw_request(request_id: str) -> Any:
    request = service_pb2.ModelInferRequest(model_name=UNARY, id=request_id)
    request.inputs.extend([_bytes_tensor("text_input"), _bytes_tensor("sampling_parameters")])
    request.raw_input_contents.extend([_raw(b"Hi"), _raw(b'{"max_tokens": 2}')])
    return request


CONTENTS_REFUSAL = ("contents field must not be specified when using raw_input_contents for "
                    f"'text_input' for model '{UNARY}'")


def test_raw_and_typed_contents_together_are_refused_on_model_infer(
        strict: ServerHandle) -> None:
    with grpc.insecure_channel(strict.grpc_url) as channel:
        stub = service_pb2_grpc.GRPCInferenceServiceStub(channel)
        with pytest.raises(grpc.RpcError) as e:
            stub.ModelInfer(_mixed_request("bad"), timeout=60)
        assert e.value.code() == grpc.StatusCode.INVALID_ARGUMENT
        assert e.value.details() == CONTENTS_REFUSAL
        # Contents on an input even when every input also has its raw entry: still refused.
        both = _raw_request("bad2")
        both.inputs[0].contents.bytes_contents.append(b"Hi")
        with pytest.raises(grpc.RpcError) as e:
            stub.ModelInfer(both, timeout=60)
        assert (e.value.code(), e.value.details()) == (grpc.StatusCode.INVALID_ARGUMENT,
                                                       CONTENTS_REFUSAL)
        reply = stub.ModelInfer(_raw_request("good"), timeout=120)
        assert reply.id == "good" and [o.name for o in reply.outputs] == ["text_output"]


def test_raw_and_typed_contents_together_are_refused_on_a_stream(strict: ServerHandle) -> None:
    with grpc.insecure_channel(strict.grpc_url) as channel:
        stub = service_pb2_grpc.GRPCInferenceServiceStub(channel)
        # A non-decoupled model answers a stream's requests in order.
        bad, good = stub.ModelStreamInfer(iter([_mixed_request("bad"), _raw_request("good")]),
                                          timeout=120)
    assert bad.error_message == CONTENTS_REFUSAL and bad.infer_response.id == "bad"
    assert not good.error_message and good.infer_response.id == "good"
    assert [o.name for o in good.infer_response.outputs] == ["text_output"]


# ---- requested outputs -------------------------------------------------------------------------


@pytest.mark.parametrize(("outputs", "message"), [
    (["nope"], f"unexpected inference output 'nope' for model '{UNARY}'"),
    (["text_output", "zz", "aa"], f"unexpected inference output 'aa' for model '{UNARY}'"),
    (["text_output", "text_output"], "[request id: r1] output 'text_output' already exists in "
                                     "request"),
])
def test_unknown_or_repeated_output_is_refused_over_grpc(
        client: grpcclient.InferenceServerClient, outputs: list[str], message: str) -> None:
    requested = [grpcclient.InferRequestedOutput(name) for name in outputs]
    with pytest.raises(InferenceServerException) as e:
        client.infer(UNARY, llm_inputs("Hi", 2, stream=False), outputs=requested,
                     request_id="r1")
    assert e.value.status() == "StatusCode.INVALID_ARGUMENT"
    assert e.value.message() == message
    _good(client)


def _post(server: ServerHandle, path: str, body: dict[str, Any]) -> tuple[int, Any]:
    request = urllib.request.Request(f"{server.http_url}{path}", data=json.dumps(body).encode(),
                                     method="POST")
    try:
        with urllib.request.urlopen(request, timeout=120) as r:
            return r.status, json.loads(r.read())
    except urllib.error.HTTPError as e:
        return e.code, json.loads(e.read())


def test_unknown_output_is_refused_over_http(strict: ServerHandle) -> None:
    inputs = [{"name": "text_input", "shape": [1], "datatype": "BYTES", "data": ["Hi"]},
              {"name": "sampling_parameters", "shape": [1], "datatype": "BYTES",
               "data": [json.dumps({"temperature": 0, "max_tokens": 2})]}]
    path = f"/v2/models/{UNARY}/infer"
    status, answer = _post(strict, path, {"inputs": inputs, "outputs": [{"name": "nope"}]})
    assert (status, answer) == (400, {"error": f"unexpected inference output 'nope' for "
                                               f"model '{UNARY}'"})
    status, answer = _post(strict, path, {"inputs": inputs, "outputs": [{"name": "text_output"}]})
    assert status == 200 and [o["name"] for o in answer["outputs"]] == ["text_output"]


# ---- sampling_parameters JSON --------------------------------------------------------------------


def test_repeated_sampling_parameter_key_is_refused(
        client: grpcclient.InferenceServerClient) -> None:
    inputs = [i for i in llm_inputs("Hi", stream=False) if i.name() != "sampling_parameters"]
    repeated = grpcclient.InferInput("sampling_parameters", [1], "BYTES")
    repeated.set_data_from_numpy(np.array([b'{"max_tokens": 2, "max_tokens": 200}'],
                                          dtype=np.object_))
    with pytest.raises(InferenceServerException) as e:
        client.infer(UNARY, [*inputs, repeated])
    assert e.value.status() == "StatusCode.INVALID_ARGUMENT"
    assert e.value.message() == ("input 'sampling_parameters' holds the key 'max_tokens' more "
                                 "than once")
    _good(client)


# ---- configs -----------------------------------------------------------------------------------


@pytest.mark.parametrize("name", list(BAD_CONFIGS))
def test_bad_config_fails_its_load_and_the_server_serves_on(
        client: grpcclient.InferenceServerClient, name: str) -> None:
    with pytest.raises(InferenceServerException) as e:
        client.load_model(name)
    assert e.value.status() == "StatusCode.INVALID_ARGUMENT"
    assert e.value.message() == f"load failed for model '{name}': {BAD_CONFIGS[name][1]}"
    assert not client.is_model_ready(name)
    _good(client)


def test_bad_config_override_fails_its_load(client: grpcclient.InferenceServerClient) -> None:
    override = {"input": [{"name": "sampling_parameters", "data_type": "TYPE_BOOL",
                           "dims": [1]}]}
    with pytest.raises(InferenceServerException) as e:
        client.load_model("int_prompt", config=json.dumps(override))
    assert e.value.status() == "StatusCode.INVALID_ARGUMENT"
    assert e.value.message() == (
        "load failed for model 'int_prompt': unable to load model 'int_prompt', configuration "
        "expects datatype TYPE_BOOL for input 'sampling_parameters', model provides "
        "TYPE_STRING")
    assert client.is_model_ready(UNARY)
    _good(client)
