"""KServe v2 REST through the official ``tritonclient.http`` (sync and aio), and raw requests
where the client cannot send what is tested (bad JSON, compressed bodies, odd framing).

One server of its own: the default model (decoupled, as the vLLM backend's) and ``unary``, the
same model not decoupled, which ``/infer`` serves. The same greedy request gives the same text
through REST and gRPC.
"""

from __future__ import annotations

import asyncio
import gzip
import json
import urllib.request
from collections.abc import Iterator
from typing import Any

import numpy as np
import pytest
import tritonclient.grpc as grpcclient
import tritonclient.http as httpclient
import tritonclient.http.aio as aiohttpclient
from tritonclient.utils import InferenceServerException

from tests.server.conftest import MODEL, ServerHandle, add_default_model, start_server

pytestmark = pytest.mark.slow
UNARY = "unary"
PROMPT = "The capital of France is"


@pytest.fixture(scope="module")
def rest(tmp_path_factory: pytest.TempPathFactory) -> Iterator[ServerHandle]:
    root = tmp_path_factory.mktemp("rest-repo")
    for name, decoupled in ((MODEL, True), (UNARY, False)):
        add_default_model(root, name, {"model": "default", "max_model_len": 1024,
                                       "kv_cache_memory_bytes": 32 * 2**20}, decoupled)
    handle = start_server(root)
    yield handle
    assert handle.stop() == 0


def _client(server: ServerHandle) -> httpclient.InferenceServerClient:
    return httpclient.InferenceServerClient(f"127.0.0.1:{server.http_port}")


def _inputs(prompt: str, max_tokens: int, binary: bool, *, module: Any = httpclient
            ) -> list[Any]:
    text = module.InferInput("text_input", [1], "BYTES")
    text.set_data_from_numpy(np.array([prompt.encode()], dtype=np.object_),
                             **({"binary_data": binary} if module is httpclient else {}))
    params = module.InferInput("sampling_parameters", [1], "BYTES")
    params.set_data_from_numpy(np.array([json.dumps(
        {"temperature": 0, "max_tokens": max_tokens}).encode()], dtype=np.object_),
        **({"binary_data": binary} if module is httpclient else {}))
    flag = module.InferInput("return_num_output_tokens", [1], "BOOL")
    flag.set_data_from_numpy(np.array([True]),
                             **({"binary_data": binary} if module is httpclient else {}))
    return [text, params, flag]


def _text(result: Any) -> str:
    """The first text output: bytes when sent binary, str when sent as JSON."""
    value = result.as_numpy("text_output")[0]
    return value.decode() if isinstance(value, bytes) else str(value)


def _raw(server: ServerHandle, path: str, body: bytes, headers: dict[str, str] | None = None,
         method: str = "POST") -> tuple[int, dict[str, str], bytes]:
    request = urllib.request.Request(f"http://127.0.0.1:{server.http_port}{path}", data=body,
                                     headers=headers or {}, method=method)
    try:
        with urllib.request.urlopen(request, timeout=120) as r:
            return r.status, dict(r.headers), r.read()
    except urllib.error.HTTPError as e:
        return e.code, dict(e.headers), e.read()


def test_health_metadata_and_config(rest: ServerHandle) -> None:
    client = _client(rest)
    assert client.is_server_live() and client.is_server_ready()
    assert client.is_model_ready(UNARY) and client.is_model_ready(UNARY, "1")
    assert not client.is_model_ready("nope")
    server = client.get_server_metadata()
    assert server["name"] == "pagedserve" and "binary_tensor_data" in server["extensions"]
    meta = client.get_model_metadata(UNARY)
    assert meta["name"] == UNARY and meta["versions"] == ["1"]
    assert {"name": "text_input", "datatype": "BYTES", "shape": [1]} in meta["inputs"]
    config = client.get_model_config(MODEL)
    assert config["name"] == MODEL and config["model_transaction_policy"]["decoupled"] is True
    assert config["max_batch_size"] == 0
    text_input = next(i for i in config["input"] if i["name"] == "text_input")
    assert text_input["data_type"] == "TYPE_STRING" and text_input["dims"] == [1]
    index = client.get_model_repository_index()
    assert {(m["name"], m["version"], m["state"]) for m in index} == {
        (MODEL, "1", "READY"), (UNARY, "1", "READY")}
    client.close()


@pytest.mark.parametrize("binary", [False, True])
def test_rest_and_grpc_give_the_same_greedy_text(rest: ServerHandle, binary: bool) -> None:
    client = _client(rest)
    outputs = [httpclient.InferRequestedOutput(name, binary_data=binary)
               for name in ("text_output", "num_output_tokens")]
    result = client.infer(UNARY, _inputs(PROMPT, 8, binary), outputs=outputs, request_id="r1")
    client.close()
    text = _text(result)
    assert result.get_response()["id"] == "r1"
    assert int(result.as_numpy("num_output_tokens")[0]) == 8
    grpc = grpcclient.InferenceServerClient(rest.grpc_url)
    reference = grpc.infer(UNARY, _inputs(PROMPT, 8, False, module=grpcclient))
    grpc.close()
    assert text == reference.as_numpy("text_output")[0].decode()
    assert text.startswith(PROMPT) and len(text) > len(PROMPT)  # the prompt is prepended


def test_binary_framing_on_the_wire(rest: ServerHandle) -> None:
    """Inputs after the JSON header by ``binary_data_size``; binary outputs after the JSON
    answer, its length in ``Inference-Header-Content-Length``."""
    prompt = PROMPT.encode()
    raw = len(prompt).to_bytes(4, "little") + prompt
    header = json.dumps({"inputs": [
        {"name": "text_input", "shape": [1], "datatype": "BYTES",
         "parameters": {"binary_data_size": len(raw)}},
        {"name": "sampling_parameters", "shape": [1], "datatype": "BYTES",
         "data": [json.dumps({"temperature": 0, "max_tokens": 4})]}],
        "outputs": [{"name": "text_output", "parameters": {"binary_data": True}}]}).encode()
    status, headers, body = _raw(rest, f"/v2/models/{UNARY}/infer", header + raw,
                                 {"Inference-Header-Content-Length": str(len(header))})
    assert status == 200, body
    assert headers["Content-Type"] == "application/octet-stream"
    length = int(headers["Inference-Header-Content-Length"])
    answer = json.loads(body[:length])
    (output,) = answer["outputs"]
    size = output["parameters"]["binary_data_size"]
    assert len(body) == length + size
    tensor = body[length:]
    assert int.from_bytes(tensor[:4], "little") == size - 4
    assert tensor[4:].decode().startswith(PROMPT)
    # Too few and too many bytes after the header are both refused, naming the input.
    for extra, message in ((raw[:-2], "unexpected size for input 'text_input'"),
                           (raw + b"xx", "unexpected additional input data")):
        status, _, body = _raw(rest, f"/v2/models/{UNARY}/infer", header + extra,
                               {"Inference-Header-Content-Length": str(len(header))})
        assert status == 400 and message in json.loads(body)["error"]


def test_compressed_request_and_response(rest: ServerHandle) -> None:
    client = _client(rest)
    for request_algorithm, response_algorithm in (("gzip", "deflate"), ("deflate", "gzip")):
        result = client.infer(UNARY, _inputs(PROMPT, 4, True),
                              request_compression_algorithm=request_algorithm,
                              response_compression_algorithm=response_algorithm)
        assert _text(result).startswith(PROMPT)
    client.close()
    # A body that inflates past the limit is refused (a compression bomb).
    bomb = gzip.compress(b"{" + b" " * (80 * 2**20) + b"}")
    status, _, body = _raw(rest, f"/v2/models/{UNARY}/infer", bomb,
                           {"Content-Encoding": "gzip"})
    assert status == 413 and "--http-max-input-size" in json.loads(body)["error"]
    status, _, body = _raw(rest, f"/v2/models/{UNARY}/infer", b"{}",
                           {"Content-Encoding": "br"})
    assert (status, json.loads(body)) == (501, {"error": "Unsupported compression type"})


def test_aio_client(rest: ServerHandle) -> None:
    async def main() -> str:
        client = aiohttpclient.InferenceServerClient(f"127.0.0.1:{rest.http_port}")
        try:
            assert await client.is_server_ready()
            result = await client.infer(UNARY, _inputs(PROMPT, 4, True))
            return _text(result)
        finally:
            await client.close()

    assert asyncio.run(main()).startswith(PROMPT)


def test_errors_as_triton_words_them(rest: ServerHandle) -> None:
    client = _client(rest)
    cases = [
        (lambda: client.infer(MODEL, _inputs(PROMPT, 2, False)), "501",
         "HTTP end point doesn't support models with decoupled transaction policy"),
        (lambda: client.infer("nope", _inputs(PROMPT, 2, False)), "404",
         "Request for unknown model: 'nope' is not found"),
        (lambda: client.infer(UNARY, _inputs(PROMPT, 2, False), model_version="7"), "404",
         "Request for unknown model: 'unary' version 7 is not found"),
        (lambda: client.get_model_metadata("nope"), "404",
         "Request for unknown model: 'nope' is not found"),
        (lambda: client.load_model(UNARY), "503",
         "explicit model load / unload is not allowed if polling is enabled"),
    ]
    for call, status, message in cases:
        with pytest.raises(InferenceServerException) as info:
            call()
        assert info.value.status() == status and message in info.value.message(), \
            (info.value.status(), info.value.message())
    wrong = httpclient.InferInput("text_input", [1], "INT32")
    wrong.set_data_from_numpy(np.array([1], dtype=np.int32))
    with pytest.raises(InferenceServerException) as info:
        client.infer(UNARY, [wrong])
    assert info.value.status() == "400"
    assert "data-type is 'INT32', but model 'unary' expects 'BYTES'" in info.value.message()
    client.close()
    path = f"/v2/models/{UNARY}/infer"
    for body, status, message in (
            (b"{not json", 500, "failed to parse the request JSON buffer"),
            (b'{"inputs": 3}', 500, "Unable to parse 'inputs'"),
            (b'{"inputs": [{"name": "stream", "shape": [2], "datatype": "BOOL", '
             b'"data": [true]}]}', 500, "Shape does not match true shape of 'data' field"),
            (b'{"inputs": [{"name": "text_input", "shape": [1], "datatype": "BYTES"}]}', 400,
             "Input must set only one of the following fields"),
            (b'{"inputs": [], "parameters": {"triton_x": 1}}', 400,
             "parameter keys starting with 'triton_' are reserved"),
            (b'{"inputs": [], "parameters": {"x": [1]}}', 400,
             "parameter 'x' has invalid type")):
        got, _, answer = _raw(rest, path, body)
        assert got == status and message in json.loads(answer)["error"], (got, answer)
    assert _raw(rest, "/v2/models/nope/config", b"", method="GET")[:1] == (404,)
    status, _, answer = _raw(rest, "/v2/nothing/here", b"", method="GET")
    assert (status, json.loads(answer)) == (404, {"error": "Not Found"})
    status, _, answer = _raw(rest, "/v2/health/live", b"")
    assert (status, json.loads(answer)) == (405, {"error": "Method Not Allowed"})
    assert _client(rest).is_server_live()  # still serving


def test_statistics_trace_and_log_settings(rest: ServerHandle) -> None:
    client = _client(rest)
    before = client.get_inference_statistics(UNARY)["model_stats"][0]
    client.infer(UNARY, _inputs(PROMPT, 2, True))
    after = client.get_inference_statistics(UNARY, "1")["model_stats"][0]
    assert after["name"] == UNARY and after["version"] == "1"
    assert after["inference_count"] == before["inference_count"] + 1
    assert after["inference_stats"]["success"]["count"] == \
        before["inference_stats"]["success"]["count"] + 1
    assert isinstance(after["inference_stats"]["queue"]["ns"], int)
    every = client.get_inference_statistics()["model_stats"]
    assert {m["name"] for m in every} == {MODEL, UNARY}
    settings = client.update_trace_settings(settings={"trace_rate": "7"})
    assert settings["trace_rate"] == "7" and settings["trace_level"] == ["OFF"]
    assert client.get_trace_settings()["trace_rate"] == "7"
    model = client.update_trace_settings(UNARY, {"trace_level": ["TIMESTAMPS"],
                                                 "trace_rate": "3"})
    assert model["trace_level"] == ["TIMESTAMPS"] and model["trace_rate"] == "3"
    assert client.get_trace_settings()["trace_level"] == ["OFF"]  # the global one is unchanged
    # null clears a model's own setting: it follows the global one again.
    cleared = client.update_trace_settings(UNARY, {"trace_level": None, "trace_rate": None})
    assert cleared["trace_level"] == ["OFF"] and cleared["trace_rate"] == "7"
    client.update_trace_settings(settings={"trace_rate": "1000"})
    logs = client.get_log_settings()
    assert logs["log_info"] is True and logs["log_verbose_level"] == 0
    assert client.update_log_settings({"log_verbose_level": 0})["log_verbose_level"] == 0
    with pytest.raises(InferenceServerException) as info:
        client.update_log_settings({"log_file": "/tmp/x"})
    assert info.value.status() == "501"
    client.close()


def test_shared_memory_is_refused_clearly(rest: ServerHandle) -> None:
    client = _client(rest)
    assert client.get_system_shared_memory_status() == []
    with pytest.raises(InferenceServerException) as info:
        client.register_system_shared_memory("r", "/key", 64)
    assert info.value.status() == "501" and "shared memory" in info.value.message()
    client.unregister_system_shared_memory()
    client.close()


def test_metrics_on_the_http_port(rest: ServerHandle) -> None:
    status, headers, body = _raw(rest, "/metrics", b"", method="GET")
    assert status == 200 and b"nv_inference_count" in body
    assert headers["Content-Type"].startswith("text/plain")


def test_infer_takes_token_ids_and_named_outputs(rest: ServerHandle) -> None:
    ids = [504, 3575, 282, 4649, 314]
    body = json.dumps({"inputs": [
        {"name": "input_ids", "shape": [len(ids)], "datatype": "INT64", "data": ids},
        {"name": "sampling_parameters", "shape": [1], "datatype": "BYTES",
         "data": [json.dumps({"temperature": 0, "max_tokens": 3})]}],
        "outputs": [{"name": "output_ids"}]}).encode()
    status, _, answer = _raw(rest, f"/v2/models/{UNARY}/infer", body)
    assert status == 200, answer
    (output,) = json.loads(answer)["outputs"]
    assert output["name"] == "output_ids" and output["datatype"] == "INT64"
    assert output["shape"] == [3] and all(isinstance(t, int) for t in output["data"])
