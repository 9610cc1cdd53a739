"""The server with a tensor-parallel model: SmolLM2 over 3 ranks (its 9 query heads and 3 KV
heads split by 3) streams the single-device greedy text through ``tritonclient``; a rank killed
mid-request fails that request with an error naming it, refuses new requests with it, and takes
the server to not-ready and not-live until an unload and a load bring it back;
SmolLM2 over 2 ranks is refused at load with the numbers that do not divide."""

from __future__ import annotations

import json
import queue
import re
import shutil
import signal
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import psutil
import pytest
import tritonclient.grpc as grpcclient
from tritonclient.utils import InferenceServerException

from pagedserve import LLM, SamplingParams
from tests.server.conftest import (
    DEFAULT_REPOSITORY,
    MODEL,
    ServerHandle,
    is_final,
    llm_inputs,
    start_server,
    text_of,
)

pytestmark = pytest.mark.slow

PROMPT = "The capital of France is"
BAD = "smollm2_tp2"
DEADLINE_S = 60


def _model(repo: Path, name: str, ranks: int) -> None:
    folder = repo / name
    (folder / "1").mkdir(parents=True)
    shutil.copy(DEFAULT_REPOSITORY / MODEL / "config.pbtxt", folder / "config.pbtxt")
    (folder / "1" / "model.json").write_text(json.dumps({
        "model": "default", "dtype": "float32", "kv_cache_memory_bytes": 64 * 2**20,
        "tensor_parallel_size": ranks}))


@pytest.fixture(scope="module")
def server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[ServerHandle]:
    repo = tmp_path_factory.mktemp("tp-repository")
    _model(repo, MODEL, 3)
    _model(repo, BAD, 2)
    handle = start_server(repo, "--model-control-mode", "explicit", "--load-model", MODEL)
    yield handle
    handle.stop()


@pytest.fixture
def client(server: ServerHandle) -> Iterator[grpcclient.InferenceServerClient]:
    c = grpcclient.InferenceServerClient(server.grpc_url)
    yield c
    c.close()


def _worker_pids(server: ServerHandle) -> list[int]:
    """The ranks of the engine loaded last."""
    found = re.findall(r"tensor parallel: 3 ranks \(tcp://[^)]*\), pids ([\d, ]+)",
                       server.log())
    assert found, server.log()
    return [int(pid) for pid in found[-1].split(", ")]


def _stream_text(client: grpcclient.InferenceServerClient, inputs: list[Any],
                 texts: list[str]) -> str:
    """Streams one request; ``texts`` gets its responses' texts."""
    results: queue.Queue[tuple[Any, Any]] = queue.Queue()
    client.start_stream(callback=lambda result, error: results.put((result, error)))
    client.async_stream_infer(MODEL, inputs)
    while True:
        result, error = results.get(timeout=DEADLINE_S)
        assert error is None, error
        texts.append(text_of(result))
        if is_final(result):
            break
    client.stop_stream()
    return "".join(texts)


def _wait_for(condition: Any, what: str) -> None:
    deadline = time.monotonic() + DEADLINE_S
    while not condition():
        assert time.monotonic() < deadline, f"no {what} within {DEADLINE_S} s"
        time.sleep(0.1)


def test_streams_the_single_device_greedy_text(client: grpcclient.InferenceServerClient,
                                               smollm: Any) -> None:
    offline = LLM(loaded=smollm, dtype="float32", kv_cache_bytes=64 * 2**20)
    want = offline.generate([PROMPT], SamplingParams(temperature=0, max_tokens=16),
                            use_tqdm=False)[0].outputs[0].text
    texts: list[str] = []
    inputs = llm_inputs(PROMPT, 16)
    assert _stream_text(client, inputs, texts) == want and len(texts) > 1


def test_a_killed_rank_fails_the_request_and_the_readiness(
        server: ServerHandle, client: grpcclient.InferenceServerClient) -> None:
    pids = _worker_pids(server)
    assert client.is_server_ready() and client.is_model_ready(MODEL)
    results: queue.Queue[tuple[Any, Any]] = queue.Queue()
    client.start_stream(callback=lambda result, error: results.put((result, error)))
    client.async_stream_infer(MODEL, llm_inputs(PROMPT, 1500, params={"ignore_eos": True}),
                              request_id="long")
    result, error = results.get(timeout=DEADLINE_S)
    assert error is None and not is_final(result)
    psutil.Process(pids[1]).send_signal(signal.SIGKILL)
    reason = rf"rank 1 \(pid {pids[1]}\) was killed by signal 9 \(SIGKILL\)"
    deadline = time.monotonic() + DEADLINE_S
    while error is None:
        result, error = results.get(timeout=max(deadline - time.monotonic(), 0.1))
    client.stop_stream()
    assert isinstance(error, InferenceServerException) and re.search(reason, error.message())
    _wait_for(lambda: not client.is_server_ready(), "ServerReady false")
    assert not client.is_model_ready(MODEL)
    assert server.http_get("/v2/health/ready")[0] == 400
    index = {m.name: m for m in client.get_model_repository_index().models}
    assert index[MODEL].state == "UNAVAILABLE" and re.search(reason, index[MODEL].reason)
    # New requests, and the model's metadata, are refused with the rank's error.
    refused = (rf"^Request for unknown model: '{MODEL}' has no available versions: version 1 "
               rf"failed: tensor-parallel worker {reason} during a step$")
    with pytest.raises(InferenceServerException) as e:
        client.get_model_metadata(MODEL)
    assert e.value.status() == "StatusCode.UNAVAILABLE" and re.search(refused, e.value.message())
    answers: queue.Queue[tuple[Any, Any]] = queue.Queue()
    client.start_stream(callback=lambda result, error: answers.put((result, error)))
    client.async_stream_infer(MODEL, llm_inputs(PROMPT, 4), request_id="after")
    result, error = answers.get(timeout=DEADLINE_S)
    client.stop_stream()
    assert result is None and re.search(refused, error.message()), error
    _wait_for(lambda: not any(psutil.pid_exists(pid) for pid in pids), "ranks reaped")
    # Not live either: nothing but an unload or a load mends it, so a liveness probe
    # restarts the server; in explicit mode an unload and a load bring it back.
    assert not client.is_server_live()
    assert server.http_get("/v2/health/live")[0] == 400
    client.unload_model(MODEL)
    assert client.is_server_live() and server.http_get("/v2/health/live")[0] == 200
    client.load_model(MODEL)
    assert client.is_server_live() and server.http_get("/v2/health/live")[0] == 200
    assert client.is_server_ready() and client.is_model_ready(MODEL)
    assert server.http_get("/v2/health/ready")[0] == 200
    assert set(_worker_pids(server)).isdisjoint(pids)
    assert _stream_text(client, llm_inputs(PROMPT, 4), [])


def test_a_shape_that_does_not_divide_fails_to_load(
        server: ServerHandle, client: grpcclient.InferenceServerClient) -> None:
    with pytest.raises(InferenceServerException,
                       match=r"tensor_parallel_size=2 does not divide the model: "
                             r"9 query heads .* 3 KV heads"):
        client.load_model(BAD)
    index = {m.name: m for m in client.get_model_repository_index().models}
    assert index[BAD].state == "UNAVAILABLE" and "9 query heads" in index[BAD].reason
    process = psutil.Process(server.process.pid)
    assert server.stop() == 0
    assert not process.is_running()
