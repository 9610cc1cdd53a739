"""Triton's HTTP behaviour, checked against real Triton 2.51 and against our server alike.

As ``test_parity.py`` does for gRPC: real Triton serves the echo models of ``tests/triton_ref.py``
(``echo_vllm`` decoupled, ``echo_unary`` not), ours its default repository and the same model
made unary; both are driven by the same raw HTTP requests and must answer with the same status
codes, the same error wording and the same JSON shapes (never the same text: the echo model
echoes, ours generates).
"""

from __future__ import annotations

import json
import tempfile
import urllib.request
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest

from tests.server.conftest import MODEL, add_default_model, start_server
from tests.triton_ref import make_echo_repository, running_triton

pytestmark = pytest.mark.slow


@dataclass(frozen=True)
class Target:
    kind: str
    url: str  # http://host:port
    decoupled: str  # a decoupled vLLM-style model
    unary: str  # the same kind of model, not decoupled


@pytest.fixture(scope="module")
def triton_target() -> Iterator[Target]:
    with tempfile.TemporaryDirectory() as tmp, running_triton(
            make_echo_repository(Path(tmp), ["echo_vllm", "echo_unary"]), http=True) as triton:
        yield Target("triton", f"http://127.0.0.1:{triton.ports.http}", "echo_vllm",
                     "echo_unary")


@pytest.fixture(scope="module")
def pagedserve_target(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Target]:
    root = tmp_path_factory.mktemp("parity-repo")
    for name, decoupled in ((MODEL, True), ("unary", False)):
        add_default_model(root, name, {"model": "default", "max_model_len": 512,
                                       "kv_cache_memory_bytes": 16 * 2**20}, decoupled)
    handle = start_server(root)
    yield Target("pagedserve", handle.http_url, MODEL, "unary")
    handle.stop()


@pytest.fixture(params=["triton", "pagedserve"])
def target(request: pytest.FixtureRequest) -> Target:
    return request.getfixturevalue(f"{request.param}_target")


def _call(target: Target, method: str, path: str, body: Any = None
          ) -> tuple[int, str, bytes]:
    data = None if body is None else body if isinstance(body, bytes) else \
        json.dumps(body).encode()
    request = urllib.request.Request(target.url + path, data=data, method=method)
    try:
        with urllib.request.urlopen(request, timeout=120) as r:
            return r.status, r.headers.get("Content-Type", ""), r.read()
    except urllib.error.HTTPError as e:
        return e.code, e.headers.get("Content-Type", ""), e.read()


def _infer_body(prompt: str = "The quick brown fox") -> dict[str, Any]:
    return {"inputs": [{"name": "text_input", "shape": [1], "datatype": "BYTES",
                        "data": [prompt]},
                       {"name": "sampling_parameters", "shape": [1], "datatype": "BYTES",
                        "data": [json.dumps({"max_tokens": 3})]}]}


def test_health_and_readiness(target: Target) -> None:
    assert _call(target, "GET", "/v2/health/live")[0::2] == (200, b"")
    assert _call(target, "GET", "/v2/health/ready")[0::2] == (200, b"")
    assert _call(target, "GET", f"/v2/models/{target.unary}/ready")[0::2] == (200, b"")
    status, _, body = _call(target, "GET", "/v2/models/nope/ready")
    assert (status, json.loads(body)) == (400, {"error": "Model version not ready"})


def test_metadata_shapes(target: Target) -> None:
    status, kind, body = _call(target, "GET", "/v2")
    assert status == 200 and kind.startswith("application/json")
    assert set(json.loads(body)) == {"name", "version", "extensions"}
    status, _, body = _call(target, "GET", f"/v2/models/{target.decoupled}")
    meta = json.loads(body)
    assert status == 200 and set(meta) == {"name", "versions", "platform", "inputs", "outputs"}
    assert {"name": "text_input", "datatype": "BYTES", "shape": [1]} in meta["inputs"]
    assert meta["versions"] == ["1"]
    status, _, body = _call(target, "GET", f"/v2/models/{target.decoupled}/config")
    config = json.loads(body)
    assert status == 200 and config["name"] == target.decoupled
    assert config["model_transaction_policy"] == {"decoupled": True}
    assert config["max_batch_size"] == 0
    text_input = next(i for i in config["input"] if i["name"] == "text_input")
    assert text_input["data_type"] == "TYPE_STRING" and text_input["dims"] == [1]
    status, _, body = _call(target, "POST", "/v2/repository/index")
    assert status == 200
    entries = {e["name"]: e for e in json.loads(body)}
    assert entries[target.unary] == {"name": target.unary, "version": "1", "state": "READY"}


def test_statistics_shape(target: Target) -> None:
    status, _, body = _call(target, "GET", f"/v2/models/{target.unary}/stats")
    (stats,) = json.loads(body)["model_stats"]
    assert status == 200 and stats["name"] == target.unary and stats["version"] == "1"
    for key in ("last_inference", "inference_count", "execution_count"):
        assert isinstance(stats[key], int)
    for phase in ("success", "fail", "queue", "compute_input", "compute_infer",
                  "compute_output"):
        assert set(stats["inference_stats"][phase]) == {"count", "ns"}
    status, _, body = _call(target, "GET", "/v2/models/nope/stats")
    assert (status, json.loads(body)) == (400, {"error": "requested model 'nope' is not "
                                                         "available"})


@pytest.mark.parametrize(("method", "path", "body", "status", "error"), [
    ("GET", "/v2/models/nope", None, 404, "Request for unknown model: 'nope' is not found"),
    ("POST", "/v2/models/nope/infer", {"inputs": []}, 404,
     "Request for unknown model: 'nope' is not found"),
    ("POST", "/v2/models/nope/generate", {"text_input": "x"}, 404,
     "Request for unknown model: 'nope' is not found"),
    ("GET", "/v2/nothing", None, 404, "Not Found"),
    ("POST", "/v2/health/live", b"", 405, "Method Not Allowed"),
])
def test_error_wording(target: Target, method: str, path: str, body: Any, status: int,
                       error: str) -> None:
    got, _, answer = _call(target, method, path, body)
    assert (got, json.loads(answer)) == (status, {"error": error})


def test_infer_refusals(target: Target) -> None:
    path = f"/v2/models/{target.decoupled}/infer"
    status, _, body = _call(target, "POST", path, _infer_body())
    assert (status, json.loads(body)) == (501, {"error": "HTTP end point doesn't support "
                                                         "models with decoupled transaction "
                                                         "policy"})
    unary = f"/v2/models/{target.unary}/infer"
    status, _, body = _call(target, "POST", unary, b"{not json")
    assert status == 500
    assert json.loads(body)["error"].startswith("failed to parse the request JSON buffer")
    # JSON data of fixed-size types are counted as they are parsed; BYTES elements are
    # counted by the checks against the model's config, after its shape.
    bad = _infer_body()
    bad["inputs"].append({"name": "stream", "shape": [2], "datatype": "BOOL", "data": [False]})
    status, _, body = _call(target, "POST", unary, bad)
    assert (status, json.loads(body)) == (500, {"error": "Unable to parse 'data': Shape does "
                                                         "not match true shape of 'data' "
                                                         "field"})
    bad = _infer_body()
    bad["inputs"][0]["shape"] = [2]
    status, _, body = _call(target, "POST", unary, bad)
    assert status == 400
    assert f"unexpected shape for input 'text_input' for model '{target.unary}'. Expected [1], " \
           "got [2]." in json.loads(body)["error"]
    status, _, body = _call(target, "POST", unary, {"inputs": [], "parameters": {"x": [1]}})
    assert (status, json.loads(body)) == (400, {"error": "parameter 'x' has invalid type. It "
                                                         "should be either 'int', 'bool', or "
                                                         "'string'."})


def test_infer_answer_shape(target: Target) -> None:
    body = {**_infer_body(), "id": "p1",
            "outputs": [{"name": "text_output", "parameters": {"binary_data": False}}]}
    status, kind, answer = _call(target, "POST", f"/v2/models/{target.unary}/infer", body)
    assert status == 200 and kind.startswith("application/json")
    result = json.loads(answer)
    assert list(result) == ["id", "model_name", "model_version", "outputs"]
    assert (result["id"], result["model_name"], result["model_version"]) == (
        "p1", target.unary, "1")
    (output,) = result["outputs"]
    assert output["name"] == "text_output" and output["datatype"] == "BYTES"
    assert isinstance(output["data"][0], str) and output["shape"] == [len(output["data"])]


def test_generate_and_generate_stream_shapes(target: Target) -> None:
    request = {"text_input": "The quick brown fox", "parameters": {"max_tokens": 3}}
    status, kind, body = _call(target, "POST", f"/v2/models/{target.decoupled}/generate",
                               request)
    answer = json.loads(body)
    assert status == 200 and kind.startswith("application/json")
    assert list(answer) == sorted(answer)
    assert {"model_name", "model_version", "text_output"} <= set(answer)
    assert isinstance(answer["text_output"], str)
    status, kind, body = _call(target, "POST",
                               f"/v2/models/{target.decoupled}/generate_stream",
                               {**request, "stream": True})
    assert status == 200 and kind.startswith("text/event-stream")
    events = [json.loads(line[6:]) for line in body.decode().split("\n\n")
              if line.startswith("data: ")]
    assert events and all({"model_name", "model_version", "text_output"} <= set(e)
                          for e in events)
    assert body.decode().endswith("\n\n")
