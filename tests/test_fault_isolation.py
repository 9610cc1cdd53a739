"""One request's failure ends that request alone; bad values are refused before they can fail.

Faults are injected into one request's share of a step (its forward rows, its sampling, its
detokenization) by wrapping the real stage: the wrapper raises whenever the marked request is
among the work it is given, and otherwise runs the real code. The other requests of the same
batches must come out token-identical to a run without the poisoned request, and every KV block
must come back.
"""

from __future__ import annotations

import asyncio
import contextlib
import threading
from collections.abc import Callable
from typing import Any

import pytest

from pagedserve import LLM, EngineConfig, SamplingParams
from pagedserve.engine.async_engine import AsyncEngine, EngineOverloaded, RequestFailed
from pagedserve.engine.core import EngineCore
from pagedserve.engine.detokenizer import IncrementalDetokenizer
from pagedserve.model.batch import ModelInput
from pagedserve.model.runner import ModelRunner
from pagedserve.model.sampler import Sampler
from tests.conftest import assert_all_blocks_free

PROMPTS = ["Hello, my name is", "The capital of France is", "def fibonacci(n):",
           "Once upon a time,", "The three primary colors are"]
GOOD = SamplingParams(temperature=0, max_tokens=24, ignore_eos=True)
POISON_SEED = 987654321  # marks the poisoned request; its params are otherwise good


@pytest.fixture(scope="module")
def llm(smollm: Any) -> LLM:
    return LLM(loaded=smollm, kv_cache_bytes=64 * 2**20)


@pytest.fixture(scope="module")
def reference(llm: LLM) -> list[list[int]]:
    outputs = llm.generate(PROMPTS, GOOD, use_tqdm=False)
    return [o.outputs[0].token_ids for o in outputs]


def _poisoned(request: Any) -> bool:
    return bool(request.params.seed == POISON_SEED)


def _run_with_poison(llm: LLM, reference: list[list[int]]) -> None:
    """Runs the good prompts with one poisoned request in the middle of the batch."""
    poison = SamplingParams(temperature=0.7, seed=POISON_SEED, max_tokens=24, ignore_eos=True)
    params = [GOOD, GOOD, poison, GOOD, GOOD, GOOD]
    outputs = llm.generate([*PROMPTS[:2], "Poison", *PROMPTS[2:]], params, use_tqdm=False)
    failed = outputs.pop(2)
    assert failed.finished and failed.error and "injected" in failed.error
    assert failed.outputs == []
    for output, want in zip(outputs, reference):
        assert output.error is None
        assert output.outputs[0].finish_reason == "length"
        assert output.outputs[0].token_ids == want
    assert_all_blocks_free(llm)


def _raise_if_poisoned(original: Callable[..., Any], requests_of: Callable[..., list[Any]]
                       ) -> Callable[..., Any]:
    def wrapper(*args: Any, **kwargs: Any) -> Any:
        if any(_poisoned(r) for r in requests_of(*args, **kwargs)):
            raise RuntimeError("injected fault")
        return original(*args, **kwargs)
    return wrapper


def test_forward_fault_of_one_request(llm: LLM, reference: list[list[int]],
                                      monkeypatch: pytest.MonkeyPatch) -> None:
    def requests_of(runner: ModelRunner, step: ModelInput) -> list[Any]:
        # The runner sees sequence ids only: find whose they are.
        owner = {s.seq_id: r for r in llm.engine.requests.values() for s in r.seqs}
        return [owner[chunk.seq_id] for chunk in step.chunks]

    monkeypatch.setattr(ModelRunner, "execute", _raise_if_poisoned(ModelRunner.execute,
                                                                   requests_of))
    _run_with_poison(llm, reference)


def test_sampling_fault_of_one_request(llm: LLM, reference: list[list[int]],
                                       monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(Sampler, "__call__", _raise_if_poisoned(
        Sampler.__call__, lambda self, logits, rows: rows))
    _run_with_poison(llm, reference)


def test_detokenizer_fault_of_one_request(llm: LLM, reference: list[list[int]],
                                          monkeypatch: pytest.MonkeyPatch) -> None:
    poisoned_prompt = llm.tokenizer.encode("Poison")

    def append(self: IncrementalDetokenizer, token: int) -> str:
        # The detokenizer sees token ids only: the poisoned one is recognised by its prompt.
        if self._tokens[:len(poisoned_prompt)] == poisoned_prompt:
            raise RuntimeError("injected fault")
        return original(self, token)

    original = IncrementalDetokenizer.append
    monkeypatch.setattr(IncrementalDetokenizer, "append", append)
    _run_with_poison(llm, reference)


def test_fault_that_no_request_explains_fails_only_its_batch(
        llm: LLM, monkeypatch: pytest.MonkeyPatch) -> None:
    """A forward that always raises fails the requests of that step; the engine serves on."""
    original = ModelRunner.execute
    monkeypatch.setattr(ModelRunner, "execute", lambda self, batch: (_ for _ in ()).throw(
        RuntimeError("injected device fault")))
    outputs = llm.generate(PROMPTS[:3], GOOD, use_tqdm=False)
    assert all(o.finished and o.error and "injected device fault" in o.error for o in outputs)
    assert_all_blocks_free(llm)
    monkeypatch.setattr(ModelRunner, "execute", original)
    assert llm.generate(PROMPTS[:1], GOOD, use_tqdm=False)[0].error is None


# ---- validation against the model -----------------------------------------------------------


@pytest.mark.parametrize(("values", "field"), [
    ({"logprobs": 10**6}, "logprobs"),
    ({"logprobs": 21}, "logprobs"),
    ({"top_k": 2**64}, "top_k"),
    ({"seed": -1}, "seed"),
    ({"max_tokens": 2**70}, "max_tokens"),
    ({"temperature": 10**400}, "temperature"),
    ({"stop_token_ids": [49152], "min_tokens": 3}, "stop_token_ids"),
    ({"stop_token_ids": [2**63]}, "stop_token_ids"),
    ({"stop_token_ids": list(range(2000))}, "stop_token_ids"),
    ({"stop": ["x"] * 100}, "stop"),
    ({"stop": ["x" * 5000]}, "stop"),
    ({"n": 10**9, "temperature": 1.0}, "n"),
])
def test_values_that_would_fail_a_step_are_refused(llm: LLM, values: dict[str, Any],
                                                   field: str) -> None:
    with pytest.raises(ValueError, match=rf"SamplingParams\.{field}"):
        llm.generate(["Hi"], SamplingParams(**values), use_tqdm=False)
    assert not llm.engine.requests


def test_rejected_values_are_not_echoed_whole() -> None:
    with pytest.raises(ValueError) as info:
        SamplingParams(temperature="x" * 100_000)  # type: ignore[arg-type]
    assert len(str(info.value)) < 300


def test_prompt_too_long_to_fit_is_refused_before_tokenizing(
        llm: LLM, monkeypatch: pytest.MonkeyPatch) -> None:
    calls = []
    monkeypatch.setattr(llm.engine.input_processor.tokenizer, "encode",
                        lambda *a, **k: calls.append(1))
    limit = llm.engine.limits.max_prompt_chars
    with pytest.raises(ValueError, match="characters"):
        llm.generate(["a" * (limit + 1)], GOOD, use_tqdm=False)
    assert calls == []
    with pytest.raises(ValueError, match="maximum context length"):
        llm.generate(prompt_token_ids=[[1] * 10**6], sampling_params=GOOD, use_tqdm=False)


# ---- the async engine -------------------------------------------------------------------


@pytest.fixture
def small_engine(smollm: Any) -> Any:
    engine = AsyncEngine(EngineCore(EngineConfig(kv_cache_bytes=32 * 2**20, max_num_seqs=2,
                                                 max_queue_size=1), smollm))
    yield engine
    engine.shutdown()


def test_requests_beyond_the_queue_are_refused(small_engine: AsyncEngine) -> None:
    long = SamplingParams(temperature=0, max_tokens=400, ignore_eos=True)

    async def main() -> None:
        streams = [small_engine.generate("Hello", long) for _ in range(3)]
        firsts = [await s.__anext__() for s in streams[:2]]  # the batch is full (max_num_seqs)
        assert all(not f.finished for f in firsts)
        queued = asyncio.ensure_future(streams[2].__anext__())
        await asyncio.sleep(0)  # lets it run up to its wait: it is in flight now
        with pytest.raises(EngineOverloaded, match="max_queue_size"):
            await small_engine.generate("Hello", GOOD).__anext__()
        queued.cancel()  # aborts it, as a cancelled caller does
        with contextlib.suppress(asyncio.CancelledError):
            await queued
        for s in streams:
            await s.aclose()
        # Room again once they are gone.
        outs = [o async for o in small_engine.generate("Hello", GOOD)]
        assert outs[-1].finished

    asyncio.run(main())
    assert small_engine.core.block_manager.num_used_blocks == 0


def test_failed_request_raises_on_its_own_stream(small_engine: AsyncEngine,
                                                 monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(Sampler, "__call__", _raise_if_poisoned(
        Sampler.__call__, lambda self, logits, rows: rows))
    poison = SamplingParams(temperature=0.7, seed=POISON_SEED, max_tokens=8)

    async def collect(params: SamplingParams) -> Any:
        return [o async for o in small_engine.generate("Hello", params)]

    async def main() -> tuple[Any, Any]:
        return tuple(await asyncio.gather(collect(GOOD), collect(poison),
                                          return_exceptions=True))

    good, bad = asyncio.run(main())
    assert isinstance(bad, RequestFailed) and "injected" in str(bad)
    assert good[-1].outputs[0].finish_reason == "length"


def test_tokenizing_does_not_hold_up_running_requests(small_engine: AsyncEngine,
                                                      monkeypatch: pytest.MonkeyPatch) -> None:
    """While one prompt is being tokenized (held here until released), a running request keeps
    receiving tokens to the end."""
    tokenizer = small_engine._inputs.tokenizer
    entered, release = threading.Event(), threading.Event()
    original = tokenizer.encode

    def slow_encode(text: str, **kwargs: Any) -> Any:
        if text.startswith("SLOW"):
            entered.set()
            release.wait(60)
        return original(text, **kwargs)

    monkeypatch.setattr(tokenizer, "encode", slow_encode)

    async def main() -> None:
        running = small_engine.generate("Hello", GOOD)
        await running.__anext__()
        slow = asyncio.ensure_future(
            _drain(small_engine.generate("SLOW prompt", SamplingParams(max_tokens=2))))
        await asyncio.to_thread(entered.wait, 60)
        outs = [o async for o in running]  # every remaining token while SLOW is stuck
        assert outs[-1].finished and not slow.done()
        release.set()
        assert (await slow)[-1].finished

    asyncio.run(main())


async def _drain(stream: Any) -> list[Any]:
    return [o async for o in stream]
