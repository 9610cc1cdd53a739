"""The checkout's ``model_repository/`` as ``serve`` serves it by default: the reference
``smollm2`` (fp32) and the fast ``smollm2-gguf`` (the embedded file's Q4_1 blocks as stored,
over an fp16 KV cache), both ready, each answering as the offline engine does with its
setting."""

from __future__ import annotations

import json
import queue
from collections.abc import Iterator
from typing import Any

import pytest
import tritonclient.grpc as grpcclient

from pagedserve import LLM, SamplingParams
from pagedserve.model.loader import LoadedModel
from tests.server.conftest import (
    CHECKOUT_REPOSITORY,
    FAST_MODEL,
    MODEL,
    ServerHandle,
    is_final,
    llm_inputs,
    start_server,
    text_of,
)

pytestmark = pytest.mark.slow
PROMPT = "The three primary colors are"
MAX_TOKENS = 12


@pytest.fixture(scope="module")
def checkout_server() -> Iterator[ServerHandle]:
    handle = start_server(CHECKOUT_REPOSITORY)
    yield handle
    assert handle.stop() == 0


def _generate(url: str, model: str) -> str:
    """The streamed text of one greedy request (both models are decoupled)."""
    results: queue.Queue[tuple[Any, Any]] = queue.Queue()
    client = grpcclient.InferenceServerClient(url)
    client.start_stream(callback=lambda result, error: results.put((result, error)))
    text = ""
    try:
        client.async_stream_infer(model, llm_inputs(PROMPT, MAX_TOKENS))
        while True:
            result, error = results.get(timeout=120)
            assert error is None, error
            text += text_of(result)
            if is_final(result):
                return text
    finally:
        client.stop_stream()
        client.close()


def test_both_models_are_ready(checkout_server: ServerHandle) -> None:
    client = grpcclient.InferenceServerClient(checkout_server.grpc_url)
    try:
        index = client.get_model_repository_index(as_json=True)["models"]
    finally:
        client.close()
    assert sorted((m["name"], m["state"]) for m in index) == [
        (MODEL, "READY"), (FAST_MODEL, "READY")]
    settings = json.loads((CHECKOUT_REPOSITORY / FAST_MODEL / "1" / "model.json").read_text())
    assert (settings["quantization"], settings["kv_cache_dtype"]) == ("gguf", "float16")


@pytest.mark.parametrize(("model", "engine_args"), [
    (MODEL, {}),
    (FAST_MODEL, {"quantization": "gguf", "dtype": "float32", "kv_cache_dtype": "float16"})])
def test_each_model_answers_as_its_offline_engine(checkout_server: ServerHandle,
                                                  smollm: LoadedModel, model: str,
                                                  engine_args: dict[str, str]) -> None:
    llm = LLM(**engine_args) if engine_args else LLM(loaded=smollm)
    params = SamplingParams(temperature=0, max_tokens=MAX_TOKENS)
    expected = llm.generate(PROMPT, params, use_tqdm=False)[0].outputs[0].text
    assert _generate(checkout_server.grpc_url, model) == expected
