"""Decoupled streaming end to end: exact text, many requests in flight, cancellation."""

from __future__ import annotations

import asyncio
import json
import queue
import time
from typing import Any

import numpy as np
import pytest
import tritonclient.grpc as grpcclient
import tritonclient.grpc.aio as aioclient

from pagedserve import LLM, SamplingParams
from tests.server.conftest import MODEL, ServerHandle, is_final, llm_inputs, text_of

pytestmark = pytest.mark.slow

PROMPTS = ["The capital of France is", "def fibonacci(n):", "Once upon a time,",
           "List three colors:", "The quick brown fox"]


@pytest.fixture(scope="module")
def offline(smollm: Any) -> LLM:
    return LLM(loaded=smollm, kv_cache_bytes=64 * 2**20)


def _collect_sync(client: grpcclient.InferenceServerClient, requests: list[tuple[str, list]],
                  empty_final: bool = False, timeout: float = 120
                  ) -> dict[str, list[Any]]:
    """Sends every request on one stream; returns each id's results in arrival order."""
    results: queue.Queue[tuple[Any, Any]] = queue.Queue()
    client.start_stream(callback=lambda result, error: results.put((result, error)))
    for request_id, inputs in requests:
        client.async_stream_infer(MODEL, inputs, request_id=request_id,
                                  enable_empty_final_response=empty_final)
    by_id: dict[str, list[Any]] = {rid: [] for rid, _ in requests}
    done: set[str] = set()
    deadline = time.monotonic() + timeout
    while len(done) < len(requests):
        result, error = results.get(timeout=max(deadline - time.monotonic(), 0.1))
        assert error is None, error
        request_id = result.get_response().id
        assert request_id in by_id and request_id not in done
        by_id[request_id].append(result)
        if is_final(result):
            done.add(request_id)
    client.stop_stream()
    return by_id


def test_streamed_text_is_the_offline_greedy_text(client: grpcclient.InferenceServerClient,
                                                  offline: LLM) -> None:
    max_tokens = 12
    expected = [o.outputs[0].text for o in offline.generate(
        PROMPTS, SamplingParams(temperature=0, max_tokens=max_tokens), use_tqdm=False)]
    requests = [(f"r{i}", llm_inputs(p, max_tokens, return_finish_reason=True,
                                     return_num_output_tokens=True))
                for i, p in enumerate(PROMPTS)]
    by_id = _collect_sync(client, requests)
    for i, want in enumerate(expected):
        results = by_id[f"r{i}"]
        assert "".join(text_of(r) for r in results) == want
        assert len(results) >= 2  # streamed in several responses, not one
        assert all(not is_final(r) for r in results[:-1]) and is_final(results[-1])
        reasons = [r.as_numpy("finish_reason")[0].decode() for r in results]
        assert reasons[:-1] == ["None"] * (len(results) - 1)
        assert reasons[-1] in ("length", "stop")
        tokens = sum(int(r.as_numpy("num_output_tokens")[0]) for r in results)
        assert tokens <= max_tokens and (reasons[-1] == "stop" or tokens == max_tokens)


def test_empty_final_response(client: grpcclient.InferenceServerClient) -> None:
    by_id = _collect_sync(client, [("e1", llm_inputs("Hello", 4))], empty_final=True)
    results = by_id["e1"]
    last = results[-1]
    assert is_final(last) and not last.get_response().outputs
    assert last.get_response().model_name == MODEL and last.get_response().model_version == "1"
    assert all(not is_final(r) and r.get_response().outputs for r in results[:-1])


def test_non_streaming_request_gets_one_whole_response(
        client: grpcclient.InferenceServerClient, offline: LLM) -> None:
    prompt = PROMPTS[0]
    want = offline.generate([prompt], SamplingParams(temperature=0, max_tokens=6),
                            use_tqdm=False)[0]
    by_id = _collect_sync(client, [
        ("w1", llm_inputs(prompt, 6, stream=False)),  # prompt prepended by default
        ("w2", llm_inputs(prompt, 6, stream=False, exclude_input_in_output=True,
                          return_num_input_tokens=True, return_cumulative_logprob=True,
                          return_logprobs=True)),
    ])
    assert [text_of(r) for r in by_id["w1"]] == [prompt + want.outputs[0].text]
    (whole,) = by_id["w2"]
    assert text_of(whole) == want.outputs[0].text
    assert int(whole.as_numpy("num_input_tokens")[0]) == len(want.prompt_token_ids)
    assert whole.as_numpy("cumulative_logprob").dtype == np.float32
    assert whole.as_numpy("logprobs")[0] == b"null"  # logprobs not asked in the parameters


def test_token_ids_in_and_out(client: grpcclient.InferenceServerClient, offline: LLM) -> None:
    prompt_ids = offline.tokenizer.encode(PROMPTS[2])
    want = offline.generate(prompt_token_ids=[prompt_ids],
                            sampling_params=SamplingParams(temperature=0, max_tokens=5),
                            use_tqdm=False)[0].outputs[0]
    for dtype, np_dtype in (("INT32", np.int32), ("INT64", np.int64)):
        ids = grpcclient.InferInput("input_ids", [len(prompt_ids)], dtype)
        ids.set_data_from_numpy(np.array(prompt_ids, dtype=np_dtype))
        inputs = [ids, *llm_inputs(None, 5)]
        results = _collect_sync(client, [("t", inputs)])["t"]
        got = [int(t) for r in results if r.as_numpy("output_ids") is not None
               for t in r.as_numpy("output_ids")]
        assert got == want.token_ids
        assert "".join(text_of(r) for r in results) == want.text


def test_logprobs_and_n(client: grpcclient.InferenceServerClient) -> None:
    inputs = llm_inputs("Pick a number:", 4, params={"temperature": 1.0, "n": 2, "seed": 3,
                                                    "logprobs": 2},
                        return_logprobs=True)
    results = _collect_sync(client, [("n2", inputs)])["n2"]
    data = [r for r in results if r.get_response().outputs]
    assert all(r.as_numpy("text_output").shape == (2,) for r in data)
    positions = [json.loads(r.as_numpy("logprobs")[0]) for r in data]
    flat = [p for step in positions for p in step]
    assert 1 <= len(flat) <= 4
    for position in flat:
        assert 2 <= len(position) <= 3
        for entry in position.values():
            assert entry["logprob"] <= 0 and entry["rank"] >= 1
            assert isinstance(entry["decoded_token"], str)


def test_64_concurrent_requests_on_one_stream(client: grpcclient.InferenceServerClient) -> None:
    requests = [(f"c{i}", llm_inputs(f"{PROMPTS[i % 5]} {i}", 3)) for i in range(64)]
    by_id = _collect_sync(client, requests, timeout=300)
    assert set(by_id) == {f"c{i}" for i in range(64)}
    for results in by_id.values():
        assert is_final(results[-1]) and "".join(text_of(r) for r in results)


async def _aio_stream(url: str, stream_no: int, per_stream: int) -> dict[str, str]:
    client = aioclient.InferenceServerClient(url)

    async def requests():
        for i in range(per_stream):
            yield {"model_name": MODEL, "request_id": f"s{stream_no}-{i}",
                   "inputs": llm_inputs(f"{PROMPTS[i % 5]} #{stream_no}", 3)}

    texts: dict[str, str] = {}
    finished: set[str] = set()
    async for result, error in client.stream_infer(requests()):
        assert error is None, error
        request_id = result.get_response().id
        texts[request_id] = texts.get(request_id, "") + text_of(result)
        if is_final(result):
            finished.add(request_id)
    await client.close()
    assert finished == {f"s{stream_no}-{i}" for i in range(per_stream)}
    return texts


def test_64_requests_across_16_aio_streams(server: ServerHandle) -> None:
    async def main() -> list[dict[str, str]]:
        return await asyncio.gather(*(_aio_stream(server.grpc_url, s, 4) for s in range(16)))

    streams = asyncio.run(asyncio.wait_for(main(), 300))
    ids = [request_id for texts in streams for request_id in texts]
    assert len(ids) == len(set(ids)) == 64
    assert all(all(texts.values()) for texts in streams)


def _wait_idle(server: ServerHandle, timeout: float = 300) -> dict[str, float]:
    key = f'{{model="{MODEL}",version="1"}}'
    deadline = time.monotonic() + timeout
    while True:
        samples = server.metrics()
        if (samples["pagedserve_kv_blocks_used" + key] == 0
                and samples["pagedserve_requests_running" + key] == 0
                and samples["pagedserve_requests_waiting" + key] == 0):
            return samples
        assert time.monotonic() < deadline, samples
        time.sleep(0.1)


def _generated(server: ServerHandle) -> float:
    return server.metrics()[f'pagedserve_generation_tokens_total{{model="{MODEL}",version="1"}}']


def test_cancelling_a_stream_aborts_its_requests(server: ServerHandle) -> None:
    key = f'{{model="{MODEL}",version="1"}}'
    _wait_idle(server)
    before = _generated(server)

    async def main() -> int:
        client = aioclient.InferenceServerClient(server.grpc_url)

        async def requests():
            for i in range(8):
                yield {"model_name": MODEL, "request_id": f"x{i}",
                       "inputs": llm_inputs(PROMPTS[i % 5], 1000,
                                            params={"ignore_eos": True})}
            await asyncio.sleep(3600)  # keep the stream open: the client cancels it

        stream = client.stream_infer(requests())
        seen = 0
        async for _result, error in stream:
            assert error is None
            seen += 1
            if seen == 24:
                used = server.metrics()["pagedserve_kv_blocks_used" + key]
                assert used > 0
                stream.cancel()
                break
        await client.close()
        return seen

    assert asyncio.run(main()) == 24
    samples = _wait_idle(server)
    tokens = samples["pagedserve_generation_tokens_total" + key]
    # Aborted: a small share of the 8 x 1000 tokens the requests asked for, and no more later.
    assert tokens - before < 8 * 1000 / 4, tokens - before
    time.sleep(0.5)
    assert _generated(server) == tokens


def test_sync_stop_stream_with_cancel_frees_blocks(server: ServerHandle) -> None:
    _wait_idle(server)
    before = _generated(server)
    client = grpcclient.InferenceServerClient(server.grpc_url)
    got: queue.Queue[Any] = queue.Queue()
    client.start_stream(callback=lambda result, error: got.put((result, error)))
    for i in range(4):
        client.async_stream_infer(MODEL, llm_inputs(PROMPTS[i], 1000,
                                                    params={"ignore_eos": True}),
                                  request_id=f"y{i}")
    for _ in range(8):
        got.get(timeout=60)
    client.stop_stream(cancel_requests=True)
    client.close()
    _wait_idle(server)
    assert _generated(server) - before < 4 * 1000 / 4  # aborted, not run to their length
    ok = _collect_sync(grpcclient.InferenceServerClient(server.grpc_url),
                       [("after", llm_inputs("Hello", 2))])
    assert is_final(ok["after"][-1])
