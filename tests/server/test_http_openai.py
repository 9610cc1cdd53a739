"""The OpenAI-compatible API through the official ``openai`` client, against the offline API.

A server of its own (the default repository, an API key set); the reference is ``LLM`` in this
process on the same weights: greedy texts, streamed deltas, logprobs and prompt logprobs must
equal it. A client that drops a stream frees its KV blocks at once (seen on ``/metrics``).
"""

from __future__ import annotations

import json
import socket
import time
import urllib.request
from collections.abc import Iterator
from typing import Any

import openai
import pytest

from pagedserve import LLM, SamplingParams
from pagedserve.model.loader import LoadedModel
from tests.server.conftest import DEFAULT_REPOSITORY, MODEL, ServerHandle, start_server

pytestmark = pytest.mark.slow
KEY = "test-key-1"
PROMPT = "The capital of France is"
CHAT = [{"role": "user", "content": "Name a primary color."}]


@pytest.fixture(scope="module")
def api(tmp_path_factory: pytest.TempPathFactory) -> Iterator[ServerHandle]:
    handle = start_server(DEFAULT_REPOSITORY, "--api-key", KEY)
    yield handle
    assert handle.stop() == 0


@pytest.fixture(scope="module")
def client(api: ServerHandle) -> Iterator[openai.OpenAI]:
    with openai.OpenAI(base_url=f"{api.http_url}/v1", api_key=KEY, max_retries=0) as c:
        yield c


@pytest.fixture(scope="module")
def offline(smollm: LoadedModel) -> LLM:
    return LLM(loaded=smollm, kv_cache_bytes=64 * 2**20)


def _greedy(offline: LLM, prompt: str, max_tokens: int, **extra: Any) -> Any:
    params = SamplingParams(temperature=0, max_tokens=max_tokens, **extra)
    return offline.generate([prompt], params, use_tqdm=False)[0]


def test_models_lists_the_ready_models(client: openai.OpenAI) -> None:
    (card,) = client.models.list().data
    assert card.id == MODEL and card.object == "model"
    assert card.model_extra is not None and card.model_extra["max_model_len"] > 0


def test_completion_equals_the_offline_greedy_text(client: openai.OpenAI,
                                                   offline: LLM) -> None:
    expected = _greedy(offline, PROMPT, 12)
    got = client.completions.create(model=MODEL, prompt=PROMPT, max_tokens=12, temperature=0)
    (choice,) = got.choices
    assert choice.text == expected.outputs[0].text
    assert choice.finish_reason == expected.outputs[0].finish_reason
    assert got.id.startswith("cmpl-") and got.model == MODEL
    assert got.usage is not None
    assert got.usage.prompt_tokens == len(expected.prompt_token_ids)
    assert got.usage.completion_tokens == len(expected.outputs[0].token_ids)
    assert got.usage.total_tokens == got.usage.prompt_tokens + got.usage.completion_tokens


def test_streamed_deltas_concatenate_to_the_offline_text(client: openai.OpenAI,
                                                         offline: LLM) -> None:
    expected = _greedy(offline, PROMPT, 16).outputs[0]
    chunks = list(client.completions.create(model=MODEL, prompt=PROMPT, max_tokens=16,
                                            temperature=0, stream=True,
                                            stream_options={"include_usage": True}))
    texts = [c.choices[0].text for c in chunks if c.choices]
    assert "".join(texts) == expected.text and len(texts) > 1
    finals = [c.choices[0].finish_reason for c in chunks if c.choices]
    assert finals[-1] == expected.finish_reason and set(finals[:-1]) == {None}
    assert chunks[-1].choices == [] and chunks[-1].usage is not None
    assert chunks[-1].usage.completion_tokens == len(expected.token_ids)


def test_chat_equals_the_offline_chat(client: openai.OpenAI, offline: LLM) -> None:
    params = SamplingParams(temperature=0, max_tokens=12)
    expected = offline.chat(CHAT, params, use_tqdm=False)[0].outputs[0]
    got = client.chat.completions.create(model=MODEL, messages=CHAT, max_tokens=12,
                                         temperature=0)
    assert got.choices[0].message.role == "assistant"
    assert got.choices[0].message.content == expected.text
    assert got.id.startswith("chatcmpl-")
    stream = client.chat.completions.create(model=MODEL, messages=CHAT,
                                            max_completion_tokens=12, temperature=0,
                                            stream=True)
    chunks = list(stream)
    assert chunks[0].choices[0].delta.role == "assistant"
    assert "".join(c.choices[0].delta.content or "" for c in chunks) == expected.text
    assert chunks[-1].choices[0].finish_reason == expected.finish_reason


def test_n_samples_seeded_and_stop_strings(client: openai.OpenAI) -> None:
    def sample() -> list[str]:
        got = client.completions.create(model=MODEL, prompt="Once upon a time,", n=2,
                                        max_tokens=12, temperature=0.9, seed=3)
        assert [c.index for c in got.choices] == [0, 1]
        return [c.text for c in got.choices]

    first = sample()
    assert sample() == first  # seeded: the same again
    stopped = client.completions.create(model=MODEL, prompt=PROMPT, max_tokens=30,
                                        temperature=0, stop=["."])
    (choice,) = stopped.choices
    assert "." not in choice.text and choice.finish_reason == "stop"
    assert choice.model_extra is not None and choice.model_extra["stop_reason"] == "."


def test_logprobs_equal_the_offline_ones(client: openai.OpenAI, offline: LLM) -> None:
    expected = _greedy(offline, PROMPT, 6, logprobs=3).outputs[0]
    got = client.completions.create(model=MODEL, prompt=PROMPT, max_tokens=6, temperature=0,
                                    logprobs=3)
    logprobs = got.choices[0].logprobs
    assert logprobs is not None and len(logprobs.tokens or []) == 6
    for token, value, position in zip(expected.token_ids, logprobs.token_logprobs or [],
                                      expected.logprobs or []):
        assert value == pytest.approx(position[token], abs=1e-4)
    assert all(len(top) >= 3 for top in logprobs.top_logprobs or [])
    offsets = logprobs.text_offset or []
    assert offsets[0] == 0 and offsets == sorted(offsets)
    chat = client.chat.completions.create(model=MODEL, messages=CHAT, max_tokens=4,
                                          temperature=0, logprobs=True, top_logprobs=2)
    content = chat.choices[0].logprobs.content  # type: ignore[union-attr]
    assert content is not None and len(content) == 4
    for entry in content:
        assert len(entry.top_logprobs) == 2 and entry.bytes == list(entry.token.encode())
        assert entry.top_logprobs[0].logprob >= entry.top_logprobs[1].logprob


def test_echo_scores_the_prompt_as_the_offline_prompt_logprobs(client: openai.OpenAI,
                                                               offline: LLM) -> None:
    """What an evaluation harness sends to score a text: echo, logprobs, no new tokens."""
    text = "Paris is the capital and largest city of France."
    expected = _greedy(offline, text, 1, prompt_logprobs=2)
    got = client.completions.create(model=MODEL, prompt=text, max_tokens=0, echo=True,
                                    logprobs=2, temperature=0)
    (choice,) = got.choices
    assert choice.text == text and choice.finish_reason == "length"
    logprobs = choice.logprobs
    assert logprobs is not None
    ids = expected.prompt_token_ids
    assert len(logprobs.token_logprobs or []) == len(ids)
    assert (logprobs.token_logprobs or [])[0] is None
    assert (logprobs.top_logprobs or [])[0] is None
    for i in range(1, len(ids)):
        position = expected.prompt_logprobs[i]
        assert (logprobs.token_logprobs or [])[i] == pytest.approx(position[ids[i]], abs=1e-4)
    assert got.usage is not None and got.usage.completion_tokens == 0
    # Prompt logprobs ask for the whole prompt to be computed: nothing came from the cache.
    details = got.usage.prompt_tokens_details
    assert details is not None and details.cached_tokens == 0


def test_cached_prompt_tokens_are_reported(client: openai.OpenAI) -> None:
    prefix = "In a small village by the sea there lived an old fisherman who " * 4
    client.completions.create(model=MODEL, prompt=prefix + "sang.", max_tokens=1)
    again = client.completions.create(model=MODEL, prompt=prefix + "slept.", max_tokens=1)
    details = again.usage.prompt_tokens_details  # type: ignore[union-attr]
    assert details is not None and details.cached_tokens >= 16  # whole blocks of the prefix


def test_errors_are_openai_error_objects(client: openai.OpenAI, api: ServerHandle) -> None:
    with pytest.raises(openai.NotFoundError) as missing:
        client.completions.create(model="nope", prompt=PROMPT, max_tokens=2)
    assert "The model `nope` does not exist." in str(missing.value)
    with pytest.raises(openai.BadRequestError) as bad:
        client.completions.create(model=MODEL, prompt=PROMPT, max_tokens=2, temperature=-1)
    assert "temperature" in str(bad.value)
    with pytest.raises(openai.BadRequestError) as bad:
        client.completions.create(model=MODEL, prompt=PROMPT, max_tokens=2,
                                  stream_options={"include_usage": True})
    assert "Stream options can only be defined when `stream=True`." in str(bad.value)
    with pytest.raises(openai.BadRequestError) as bad:
        client.completions.create(model=MODEL, prompt="x " * 5000, max_tokens=2)
    assert "maximum context" in str(bad.value)
    with openai.OpenAI(base_url=f"{api.http_url}/v1", api_key="wrong",
                       max_retries=0) as intruder, pytest.raises(openai.AuthenticationError):
        intruder.models.list()
    request = urllib.request.Request(f"{api.http_url}/v1/completions", data=b"{not json",
                                     headers={"Authorization": f"Bearer {KEY}"})
    with pytest.raises(urllib.error.HTTPError) as raw:
        urllib.request.urlopen(request, timeout=60)
    error = json.loads(raw.value.read())["error"]
    assert raw.value.code == 400 and error["code"] == 400 and error["type"] == "BadRequestError"
    assert client.models.list().data  # still serving


def _idle(api: ServerHandle) -> dict[str, float]:
    key = f'{{model="{MODEL}",version="1"}}'
    deadline = time.monotonic() + 300
    while True:
        samples = api.metrics()
        if (samples["pagedserve_kv_blocks_used" + key] == 0
                and samples["pagedserve_requests_running" + key] == 0):
            return samples
        assert time.monotonic() < deadline, samples
        time.sleep(0.1)


def test_a_client_that_disconnects_frees_its_blocks(api: ServerHandle) -> None:
    key = f'{{model="{MODEL}",version="1"}}'
    before = _idle(api)["pagedserve_generation_tokens_total" + key]
    body = json.dumps({"model": MODEL, "prompt": PROMPT, "max_tokens": 1000,
                       "ignore_eos": True, "stream": True}).encode()
    with socket.create_connection(("127.0.0.1", api.http_port), timeout=120) as sock:
        sock.sendall(b"POST /v1/completions HTTP/1.1\r\nHost: x\r\nContent-Type: "
                     b"application/json\r\nAuthorization: Bearer " + KEY.encode() +
                     b"\r\nContent-Length: " + str(len(body)).encode() + b"\r\n\r\n" + body)
        received = b""
        while received.count(b"data: ") < 4:
            received += sock.recv(65536)
        assert api.metrics()["pagedserve_kv_blocks_used" + key] > 0
    after = _idle(api)["pagedserve_generation_tokens_total" + key]
    assert after - before < 1000 / 4  # aborted: a small share of the tokens asked for


def test_requests_count_in_triton_and_vllm_metrics(client: openai.OpenAI,
                                                   api: ServerHandle) -> None:
    key = f'{{model="{MODEL}",version="1"}}'
    before = api.metrics()
    client.completions.create(model=MODEL, prompt=PROMPT, max_tokens=2)
    client.chat.completions.create(model=MODEL, messages=CHAT, max_tokens=2)
    after = api.metrics()
    assert after["nv_inference_request_success" + key] - \
        before["nv_inference_request_success" + key] == 2
    vllm_key = f'vllm:request_success_total{{engine="1",finished_reason="length",' \
               f'model_name="{MODEL}"}}'
    assert after[vllm_key] - before.get(vllm_key, 0) == 2


def test_beam_search_and_best_of_equal_the_offline_ones(client: openai.OpenAI,
                                                        offline: LLM) -> None:
    beams = offline.generate([PROMPT], SamplingParams(beam_width=2, n=2, max_tokens=8),
                             use_tqdm=False)[0].outputs
    got = client.completions.create(model=MODEL, prompt=PROMPT, n=2, max_tokens=8,
                                    extra_body={"use_beam_search": True})
    assert [c.text for c in got.choices] == [b.text for b in beams]
    samples = offline.generate([PROMPT], SamplingParams(n=3, temperature=0.8, seed=11,
                                                        max_tokens=8), use_tqdm=False)[0]
    best = max(samples.outputs, key=lambda s: s.cumulative_logprob or 0.0)
    got = client.completions.create(model=MODEL, prompt=PROMPT, max_tokens=8, temperature=0.8,
                                    seed=11, extra_body={"best_of": 3})
    (choice,) = got.choices
    assert choice.text == best.text
