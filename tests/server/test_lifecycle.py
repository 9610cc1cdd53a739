"""Explicit model control, config overrides, versions, unary ModelInfer, and SIGTERM draining.

One server in ``explicit`` mode over a temporary repository, with a small message limit.
"""

from __future__ import annotations

import json
import queue
import shutil
import signal
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import tritonclient.grpc as grpcclient
from tritonclient.utils import InferenceServerException

from pagedserve import LLM, SamplingParams
from tests.server.conftest import (
    DEFAULT_REPOSITORY,
    ServerHandle,
    is_final,
    llm_inputs,
    start_server,
    tensor,
    text_of,
)

pytestmark = pytest.mark.slow

MODEL_JSON = {"model": "default", "max_model_len": 256, "kv_cache_memory_bytes": 16 * 2**20,
              "enforce_eager": True}


@pytest.fixture(scope="module")
def repo(tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("repo")
    tiny = root / "tiny"
    tiny.mkdir()
    shutil.copy(DEFAULT_REPOSITORY / "smollm2" / "config.pbtxt", tiny / "config.pbtxt")
    for version in ("1", "2"):
        (tiny / version).mkdir()
        (tiny / version / "model.json").write_text(json.dumps(MODEL_JSON))
    (tiny / "not_a_version").mkdir()
    broken = root / "broken"
    (broken / "1").mkdir(parents=True)
    (broken / "config.pbtxt").write_text('backend: "onnxruntime"\n')
    return root


@pytest.fixture(scope="module")
def explicit(repo: Path) -> Iterator[ServerHandle]:
    handle = start_server(repo, "--model-control-mode", "explicit", "--load-model", "tiny",
                          "--max-message-bytes", str(2**20), "--grace-period", "60")
    yield handle
    handle.stop()


@pytest.fixture
def client(explicit: ServerHandle) -> Iterator[grpcclient.InferenceServerClient]:
    c = grpcclient.InferenceServerClient(explicit.grpc_url)
    yield c
    c.close()


def _index(client: grpcclient.InferenceServerClient) -> dict[str, list[dict[str, str]]]:
    rows: dict[str, list[dict[str, str]]] = {}
    for row in client.get_model_repository_index(as_json=True)["models"]:
        rows.setdefault(row["name"], []).append(row)
    return rows


def test_startup_loads_only_the_named_model_at_its_latest_version(
        client: grpcclient.InferenceServerClient) -> None:
    index = _index(client)
    assert index["broken"] == [{"name": "broken"}]  # never asked to load: name only
    assert index["tiny"] == [{"name": "tiny", "version": "2", "state": "READY"}]
    assert client.get_model_metadata("tiny").versions == ["2"]
    assert not client.is_model_ready("tiny", "1")


def test_failed_load_reports_the_reason(client: grpcclient.InferenceServerClient) -> None:
    with pytest.raises(InferenceServerException) as e:
        client.load_model("broken")
    assert "unsupported backend 'onnxruntime'" in e.value.message()
    (row,) = _index(client)["broken"]
    assert row["state"] == "UNAVAILABLE" and "onnxruntime" in row["reason"]
    with pytest.raises(InferenceServerException) as e:
        client.load_model("missing")
    assert "failed to load 'missing'" in e.value.message()
    assert client.is_server_live()


def test_load_with_config_override_all_versions_not_decoupled(
        client: grpcclient.InferenceServerClient) -> None:
    override = {"backend": "vllm", "version_policy": {"all": {}},
                "model_transaction_policy": {"decoupled": False}}
    client.load_model("tiny", config=json.dumps(override))
    assert client.is_model_ready("tiny", "1") and client.is_model_ready("tiny", "2")
    assert sorted(client.get_model_metadata("tiny").versions) == ["1", "2"]
    config = client.get_model_config("tiny", as_json=True)["config"]
    assert not config.get("model_transaction_policy", {}).get("decoupled", False)
    # The override has no inputs: the vLLM backend's are filled in, text_input required.
    assert {i["name"]: i.get("optional", False) for i in config["input"]}["text_input"] is False


def test_unary_infer_returns_the_whole_completion(
        client: grpcclient.InferenceServerClient, smollm: Any) -> None:
    prompt = "The capital of France is"
    want = LLM(loaded=smollm, kv_cache_bytes=16 * 2**20).generate(
        [prompt], SamplingParams(temperature=0, max_tokens=6), use_tqdm=False)[0]
    result = client.infer("tiny", llm_inputs(prompt, 6, stream=False,
                                             return_num_output_tokens=True),
                          model_version="1", request_id="u1")
    assert result.get_response().id == "u1" and result.get_response().model_version == "1"
    assert text_of(result) == prompt + want.outputs[0].text
    assert int(result.as_numpy("num_output_tokens")[0]) == len(want.outputs[0].token_ids)
    only = client.infer("tiny", llm_inputs(prompt, 6, stream=False,
                                           exclude_input_in_output=True),
                        outputs=[grpcclient.InferRequestedOutput("text_output")])
    assert text_of(only) == want.outputs[0].text
    assert [o.name for o in only.get_response().outputs] == ["text_output"]


@pytest.mark.parametrize(("case", "kwargs", "code", "message"), [
    ("unknown model", {"model_name": "nope"}, "NOT_FOUND",
     "Request for unknown model: 'nope' is not found"),
    ("unknown version", {"model_version": "5"}, "NOT_FOUND", "version 5 is not found"),
    ("bad version", {"model_version": "x"}, "INVALID_ARGUMENT", "failed to parse"),
    ("missing required input", {"inputs": [tensor("stream", False, "BOOL")]},
     "INVALID_ARGUMENT", "missing required input(s) ['text_input']"),
    ("bad sampling parameter", {"inputs": llm_inputs("Hi", stream=False,
                                                     params={"top_k": -1})},
     "INVALID_ARGUMENT", "top_k"),
    ("prompt too long", {"inputs": llm_inputs("word " * 300, stream=False)},
     "INVALID_ARGUMENT", "maximum context length is 256"),
    ("oversized message", {"inputs": llm_inputs("x" * (2**20 + 10), stream=False)},
     "RESOURCE_EXHAUSTED", ""),
])
def test_unary_errors_then_success(client: grpcclient.InferenceServerClient, case: str,
                                   kwargs: dict[str, Any], code: str, message: str) -> None:
    request = {"model_name": "tiny", "inputs": llm_inputs("Hi", 2, stream=False), **kwargs}
    with pytest.raises(InferenceServerException) as e:
        client.infer(**request)
    assert e.value.status() == f"StatusCode.{code}", e.value
    assert message in e.value.message()
    assert text_of(client.infer("tiny", llm_inputs("Hi", 2, stream=False)))


def test_non_decoupled_stream_answers_in_request_order(
        client: grpcclient.InferenceServerClient) -> None:
    got: queue.Queue[Any] = queue.Queue()
    client.start_stream(callback=lambda result, error: got.put((result, error)))
    long = llm_inputs("Tell me a story.", 24, stream=False, params={"ignore_eos": True})
    client.async_stream_infer("tiny", long, request_id="first")
    client.async_stream_infer("tiny", llm_inputs("Hi", 1, stream=False), request_id="second")
    order = []
    for _ in range(2):
        result, error = got.get(timeout=120)
        assert error is None
        assert is_final(result)
        order.append(result.get_response().id)
    client.stop_stream()
    assert order == ["first", "second"]


def test_unload(client: grpcclient.InferenceServerClient) -> None:
    client.unload_model("tiny")
    assert not client.is_model_ready("tiny")
    rows = _index(client)["tiny"]
    assert {(r["version"], r["state"], r["reason"]) for r in rows} == {
        ("1", "UNAVAILABLE", "unloaded"), ("2", "UNAVAILABLE", "unloaded")}
    with pytest.raises(InferenceServerException) as e:
        client.infer("tiny", llm_inputs("Hi", 2, stream=False))
    assert e.value.status() == "StatusCode.UNAVAILABLE"
    client.load_model("tiny")
    assert client.is_model_ready("tiny")


def test_sigterm_lets_the_in_flight_stream_finish(explicit: ServerHandle) -> None:
    client = grpcclient.InferenceServerClient(explicit.grpc_url)
    got: queue.Queue[Any] = queue.Queue()
    client.start_stream(callback=lambda result, error: got.put((result, error)))
    client.async_stream_infer("tiny", llm_inputs("Count to ten:", 40,
                                                 params={"ignore_eos": True}), request_id="z")
    got.get(timeout=60)  # generating
    explicit.process.send_signal(signal.SIGTERM)
    texts = []
    while True:
        result, error = got.get(timeout=120)
        assert error is None, error
        texts.append(text_of(result))
        if is_final(result):
            break
    assert explicit.stop() == 0
    assert len(texts) >= 30
    assert "Server stopped" in explicit.log()
