"""Real Triton hosting our engine (``backend/python_backend``) against our own server.

One ``tritonserver`` (the nvidia-pytriton wheel's, started by ``pagedserve.python_backend.host``)
serves a copy of ``model_repository/`` with a small engine, in explicit model-control mode;
our server is the session's. The same greedy requests through ``tritonclient`` must give the
same texts, finish reasons, token counts and logprobs from both. Then, through Triton: a
cancelled request frees its KV blocks (our gauge on Triton's metrics port), a bad
``sampling_parameters`` gets our error, perf_analyzer streams, and unloading releases the engine
(the test loads the model again, so the tests may run in any order).
"""

from __future__ import annotations

import json
import queue
import re
import shutil
import subprocess
import time
import urllib.request
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import tritonclient.grpc as grpcclient

from pagedserve.python_backend.host import Ports, TritonHost, wait_ready
from tests.server.conftest import (
    DEFAULT_REPOSITORY,
    MODEL,
    ServerHandle,
    free_port,
    is_final,
    llm_inputs,
    tensor,
)

pytestmark = pytest.mark.slow  # a tritonserver process hosting our engine

ROOT = Path(__file__).resolve().parents[2]
# Small enough to load fast, big enough for every case here (beams of 4 included).
SMALL_ENGINE = {"max_num_seqs": 8, "kv_cache_memory_bytes": 64 * 2**20, "max_model_len": 1024}
ALL_FLAGS = {"return_finish_reason": True, "return_cumulative_logprob": True,
             "return_num_input_tokens": True, "return_num_output_tokens": True}


@pytest.fixture(scope="module")
def triton(tmp_path_factory: pytest.TempPathFactory) -> Iterator[TritonHost]:
    """Triton serving ``model_repository/`` unchanged but for a smaller engine in model.json."""
    repo = tmp_path_factory.mktemp("triton") / "repo"
    shutil.copytree(DEFAULT_REPOSITORY, repo)
    settings = repo / MODEL / "1" / "model.json"
    settings.write_text(json.dumps({**json.loads(settings.read_text()), **SMALL_ENGINE}))
    host = TritonHost(repo, Ports(grpc=free_port(), metrics=free_port()),
                      ["--model-control-mode=explicit", f"--load-model={MODEL}"])
    host.start()
    yield host
    host.stop()


@pytest.fixture(scope="module")
def ours(server: ServerHandle) -> str:
    wait_ready(server.grpc_url)
    return server.grpc_url


def _run(url: str, requests: list[list[Any]]) -> list[dict[str, Any]]:
    """Sends the requests one after another on one stream; returns what each came back with:
    per sequence the concatenated text, the last finish reason, the summed token counts and
    every logprob position; or the error."""
    client = grpcclient.InferenceServerClient(url)
    responses: queue.Queue[tuple[Any, Any]] = queue.Queue()
    client.start_stream(callback=lambda result, error: responses.put((result, error)))
    results = []
    try:
        for i, inputs in enumerate(requests):
            client.async_stream_infer(MODEL, inputs, request_id=str(i))
            results.append(_collect(responses))
    finally:
        client.stop_stream()
        client.close()
    return results


def _collect(responses: queue.Queue[tuple[Any, Any]]) -> dict[str, Any]:
    out: dict[str, Any] = {"texts": [], "finish": None, "cumulative": None, "num_input": None,
                           "num_output": None, "logprobs": None, "responses": 0}
    while True:
        result, error = responses.get(timeout=120)
        if error is not None:
            return {"error": str(error)}
        out["responses"] += 1
        texts = [t.decode() for t in result.as_numpy("text_output").reshape(-1)]
        out["texts"] = [a + b for a, b in zip(out["texts"], texts)] or texts
        if result.as_numpy("finish_reason") is not None:
            out["finish"] = [r.decode() for r in result.as_numpy("finish_reason")]
        if result.as_numpy("cumulative_logprob") is not None:
            out["cumulative"] = [round(float(c), 3) for c in result.as_numpy("cumulative_logprob")]
        if result.as_numpy("num_input_tokens") is not None:
            out["num_input"] = int(result.as_numpy("num_input_tokens")[0])
        counts = result.as_numpy("num_output_tokens")
        if counts is not None:
            out["num_output"] = [a + int(b) for a, b in zip(out["num_output"] or [0] * len(counts),
                                                            counts)]
        logprobs = result.as_numpy("logprobs")
        if logprobs is not None:
            positions = [json.loads(x) for x in logprobs]
            out["logprobs"] = [(a or []) + (b or []) for a, b in
                               zip(out["logprobs"] or [None] * len(positions), positions)]
        if is_final(result):
            return out


def _rounded(logprobs: list[list[dict[str, Any]]] | None) -> Any:
    """Logprob positions with values to 3 decimals: the two processes may order float sums
    differently (threads), never differently enough to change a token."""
    if logprobs is None:
        return None
    return [[{tok: (round(v["logprob"], 3), v["rank"], v["decoded_token"])
              for tok, v in position.items()} for position in seq] for seq in logprobs]


CASES = {
    "stream": llm_inputs("The capital of France is", 12, stream=True, **ALL_FLAGS),
    "whole": llm_inputs("The capital of France is", 12, stream=False, **ALL_FLAGS),
    "excluded": llm_inputs("Once upon a time,", 10, stream=False, exclude_input_in_output=True,
                           **ALL_FLAGS),
    # n > 1 needs sampling: seeded, so both engines draw the same tokens.
    "n2": llm_inputs("def fibonacci(n):", 8, stream=True,
                     params={"n": 2, "temperature": 0.8, "seed": 7}, **ALL_FLAGS),
    "beams": llm_inputs("The best way to learn is", 10, stream=False,
                        params={"beam_width": 4, "n": 2, "length_penalty": 0.8}, **ALL_FLAGS),
    "stop": llm_inputs("Count: one, two, three,", 24, stream=True, params={"stop": [" six"]},
                       **ALL_FLAGS),
    "logprobs": llm_inputs("Paris is", 6, stream=True, params={"logprobs": 3},
                           return_logprobs=True, **ALL_FLAGS),
    # The vLLM backend's structured-outputs request: the constraint as a JSON string.
    "choice": llm_inputs("Is 'I loved it' positive or negative?", 8, stream=True, params={
        "structured_outputs": json.dumps({"choice": ["Positive", "Negative"]})}, **ALL_FLAGS),
    "ids": [tensor("input_ids", [1, 504, 3575, 282], "INT64"),
            tensor("sampling_parameters", json.dumps({"temperature": 0, "max_tokens": 5}),
                   "BYTES")],
}


def test_same_outputs_as_our_server(triton: TritonHost, ours: str) -> None:
    requests = list(CASES.values())
    theirs, mine = _run(triton.grpc_url, requests), _run(ours, requests)
    for name, a, b in zip(CASES, theirs, mine):
        assert "error" not in a and "error" not in b, (name, a, b)
        a["logprobs"], b["logprobs"] = _rounded(a["logprobs"]), _rounded(b["logprobs"])
        assert a == b, name
    stream, whole, n2, beams, stop, choice = (
        theirs[list(CASES).index(k)] for k in ("stream", "whole", "n2", "beams", "stop",
                                               "choice"))
    assert choice["texts"][0] in ("Positive", "Negative")
    assert stream["responses"] > 1 and whole["responses"] == 1  # deltas, or one response
    assert whole["texts"][0] == "The capital of France is" + stream["texts"][0]
    assert len(n2["texts"]) == 2 and len(beams["texts"]) == 2 and beams["finish"]
    assert stop["finish"] == ["stop"] and " six" not in stop["texts"][0]


def _gauge(triton: TritonHost, name: str) -> float:
    url = f"http://127.0.0.1:{triton.ports.metrics}/metrics"
    with urllib.request.urlopen(url, timeout=10) as response:
        for line in response.read().decode().splitlines():
            series, _, value = line.rpartition(" ")
            if not series.startswith(name + "{"):
                continue
            labels = dict(re.findall(r'(\w+)="([^"]*)"', series))
            if labels.get("model") == MODEL and labels.get("version") == "1":
                assert labels.get("instance"), series  # each instance has a series of its own
                return float(value)
    raise AssertionError(f"{name} not on Triton's metrics page")


def _wait_for(condition: Any, what: str, timeout: float = 30.0) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out waiting until {what}")
        time.sleep(0.1)


def test_cancelled_request_frees_its_blocks(triton: TritonHost) -> None:
    client = grpcclient.InferenceServerClient(triton.grpc_url)
    responses: queue.Queue[tuple[Any, Any]] = queue.Queue()
    client.start_stream(callback=lambda result, error: responses.put((result, error)))
    try:
        client.async_stream_infer(MODEL, llm_inputs(
            "Tell me a long story.", 900, stream=True, params={"ignore_eos": True}))
        for _ in range(3):  # it is generating
            result, error = responses.get(timeout=120)
            assert error is None and not is_final(result)
        assert _gauge(triton, "pagedserve_kv_blocks_used") > 0
        assert _gauge(triton, "vllm:num_requests_running") == 1
        client.stop_stream(cancel_requests=True)
        _wait_for(lambda: _gauge(triton, "pagedserve_kv_blocks_used") == 0,
                  "the cancelled request's blocks are free")
        assert _gauge(triton, "vllm:num_requests_running") == 0
        assert _gauge(triton, "vllm:kv_cache_usage_perc") == 0
    finally:
        client.close()
    # The engine serves on.
    (after,) = _run(triton.grpc_url, [CASES["whole"]])
    assert after["finish"] == ["length"]


@pytest.mark.parametrize(("params", "named"), [
    ({"temperature": "hot"}, "sampling parameter 'temperature' must be of type float"),
    ({"max_tokens": 8, "nonsense": 1}, "nonsense"),
    ({"top_p": 7}, "top_p"),
    ({"structured_outputs": json.dumps({"regex": "[a-"})}, "structured_outputs.regex"),
])
def test_bad_sampling_parameters_get_our_error(triton: TritonHost, ours: str,
                                               params: dict[str, Any], named: str) -> None:
    inputs = llm_inputs("Hello", 4, stream=True, params=params)
    (theirs,), (mine,) = _run(triton.grpc_url, [inputs]), _run(ours, [inputs])
    # Streamed errors carry no status code; the message is the model's, word for word (our
    # server names the request in refusals that come from the engine, a constraint's here).
    assert named in theirs["error"]
    assert theirs["error"] == mine["error"].removeprefix("[request id: 0] ")


def test_perf_analyzer_streams_through_triton(triton: TritonHost, tmp_path: Path) -> None:
    from tests.test_perf_analyzer import SCRIPT, short_input

    out = tmp_path / "pa.csv"
    run = subprocess.run(
        ["bash", str(SCRIPT), "-u", triton.grpc_url, "-m", MODEL, "-c", "2",
         "-d", str(short_input(tmp_path)), "-f", str(out), "--", "--measurement-mode",
         "count_windows", "--measurement-request-count", "6", "-r", "3", "-s", "10000"],
        capture_output=True, text=True, timeout=600)
    assert run.returncode == 0, run.stdout[-3000:] + run.stderr[-3000:]
    assert "Throughput:" in run.stdout
    row = out.read_text().splitlines()
    assert len(row) == 2 and float(row[1].split(",")[1]) > 0  # Inferences/Second


def test_unload_releases_the_engine(triton: TritonHost) -> None:
    client = grpcclient.InferenceServerClient(triton.grpc_url)
    try:
        client.unload_model(MODEL)
        _wait_for(lambda: f"pagedserve: engine of '{MODEL}' released" in triton.log(),
                  "the model's finalize stopped the engine")
        _wait_for(lambda: [m.state for m in client.get_model_repository_index().models]
                  == ["UNAVAILABLE"], "Triton reports the model unloaded")
        assert not client.is_model_ready(MODEL)
    finally:
        # The module's other tests share this Triton: they find the model as they left it.
        client.load_model(MODEL)
        _wait_for(lambda: client.is_model_ready(MODEL), "the model is loaded again", 300)
        client.close()
    (after,) = _run(triton.grpc_url, [CASES["whole"]])
    assert after["finish"] == ["length"]
