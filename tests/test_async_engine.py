"""The async engine: concurrent streams, deltas that add up, aborts that free blocks."""

from __future__ import annotations

import asyncio
import contextlib
import time

import pytest

from pagedserve import LLM, EngineConfig, SamplingParams
from pagedserve.engine.async_engine import AsyncEngine
from pagedserve.engine.core import EngineCore

PROMPTS = ["Hello, my name is", "def quicksort(arr):", "Les fleurs du printemps",
           "Emoji: 🎉🎉", "The year 1969 is famous because"]


@pytest.fixture(scope="module")
def async_engine(smollm):
    engine = AsyncEngine(EngineCore(EngineConfig(kv_cache_bytes=128 * 2**20), smollm))
    yield engine
    engine.shutdown()


async def _collect(engine: AsyncEngine, prompt: str, params: SamplingParams,
                   request_id: str | None = None) -> tuple[str, list, object]:
    deltas, final = [], None
    async for out in engine.generate(prompt, params, request_id=request_id):
        deltas.append(out.delta_texts[0])
        final = out
    return "".join(deltas), deltas, final


def test_concurrent_streams_match_offline(async_engine, smollm):
    params = SamplingParams(temperature=0, max_tokens=20, stop=["\n\n"])
    offline = LLM(loaded=smollm, kv_cache_bytes=64 * 2**20).generate(PROMPTS, params,
                                                                      use_tqdm=False)

    async def main():
        return await asyncio.gather(*[_collect(async_engine, p, params) for p in PROMPTS])

    for (joined, deltas, final), ref in zip(asyncio.run(main()), offline):
        assert joined == final.outputs[0].text == ref.outputs[0].text
        assert final.outputs[0].token_ids == ref.outputs[0].token_ids
        assert final.finished and len(deltas) > 1
    assert async_engine.core.block_manager.num_used_blocks == 0


def test_abort_and_abandoned_iterators_free_blocks(async_engine):
    params = SamplingParams(temperature=0.8, max_tokens=500, ignore_eos=True, seed=1)

    async def abandon() -> int:
        seen = 0
        async with contextlib.aclosing(async_engine.generate("Tell me a long story.",
                                                             params)) as stream:
            async for _ in stream:
                seen += 1
                if seen == 3:
                    break  # closing the iterator aborts the request
        return seen

    async def cancel() -> None:
        async def consume() -> None:
            async for _ in async_engine.generate("A story that never ends:", params):
                pass

        task = asyncio.create_task(consume())
        await asyncio.sleep(0.3)
        task.cancel()
        with pytest.raises(asyncio.CancelledError):
            await task

    async def abort_by_id() -> str | None:
        final = None
        async for out in async_engine.generate("Another long story:", params, request_id="x1"):
            if len(out.outputs[0].token_ids) == 2:
                async_engine.abort("x1")
            final = out
        return final.outputs[0].finish_reason

    async def main():
        return await asyncio.gather(abandon(), abort_by_id(), cancel())

    seen, reason, _ = asyncio.run(main())
    assert seen == 3 and reason == "abort"

    async def settle():
        for _ in range(200):
            if not async_engine.core.requests:
                return
            await asyncio.sleep(0.01)

    asyncio.run(settle())
    core = async_engine.core
    assert not core.requests and not core.scheduler.running and not core.scheduler.waiting
    assert core.block_manager.num_used_blocks == 0


def test_bad_requests_raise_and_engine_keeps_serving(async_engine):
    async def main():
        with pytest.raises(ValueError, match="prompt must not be empty"):
            async for _ in async_engine.generate("", SamplingParams()):
                pass
        too_long = "word " * 9000
        with pytest.raises(ValueError, match="maximum context length"):
            async for _ in async_engine.generate(too_long, SamplingParams()):
                pass
        joined, _, final = await _collect(async_engine, "Hi", SamplingParams(temperature=0,
                                                                             max_tokens=4))
        return joined, final

    joined, final = asyncio.run(main())
    assert final.finished and len(final.outputs[0].token_ids) == 4
    assert joined == final.outputs[0].text
    assert async_engine.core.block_manager.num_used_blocks == 0


def test_duplicate_request_id_is_rejected(async_engine):
    params = SamplingParams(temperature=0, max_tokens=30, ignore_eos=True)

    async def main():
        first = async_engine.generate("Count: 1, 2, 3,", params, request_id="dup")
        await first.__anext__()
        with pytest.raises(ValueError, match="already in use"):
            async for _ in async_engine.generate("Hi", params, request_id="dup"):
                pass
        rest = [o async for o in first]
        return rest[-1]

    final = asyncio.run(main())
    assert final.finished and len(final.outputs[0].token_ids) == 30
    assert async_engine.core.block_manager.num_used_blocks == 0


def test_a_closed_event_loop_does_not_kill_the_engine(async_engine):
    params = SamplingParams(temperature=0, max_tokens=200, ignore_eos=True)

    async def leave_early():
        stream = async_engine.generate("Abandoned:", params)
        await stream.__anext__()  # the loop closes with the request still running

    asyncio.run(leave_early())

    async def after():
        return [o async for o in async_engine.generate("Hi", SamplingParams(max_tokens=3))]

    outputs = asyncio.run(after())
    assert outputs[-1].finished
    for _ in range(100):
        if not async_engine.core.requests:
            break
        time.sleep(0.05)
    assert not async_engine.core.requests
    assert async_engine.core.block_manager.num_used_blocks == 0
