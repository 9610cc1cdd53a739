"""KV sharing end to end: prefix caching changes no output, n > 1 prefills its prompt once."""

from __future__ import annotations

import asyncio
import time

import pytest

from pagedserve import LLM, EngineConfig, SamplingParams
from pagedserve.engine.async_engine import AsyncEngine
from pagedserve.engine.core import EngineCore
from pagedserve.model.loader import LoadedModel, load_model
from tests.conftest import TinyFactory, assert_all_blocks_free
from tests.prompts import LONG_PROMPT, TOKENIZER_VOCAB, random_prompts

GREEDY = SamplingParams(temperature=0, max_tokens=24, ignore_eos=True)


def _ids(outputs) -> list[list[int]]:
    return [o.outputs[0].token_ids for o in outputs]


def _sharing_workload(tokenizer) -> list[list[int]]:
    prefix = tokenizer.encode(LONG_PROMPT)[:300]
    questions = ["Summarise it.", "Who invented paging?", "Translate to French:", "Why blocks?",
                 "List three facts.", "Give a title.", "Explain like I am five.", "Go on."]
    return [prefix + tokenizer.encode(q) for q in questions]


def _run_sharing(llm: LLM, prompts: list[list[int]]) -> list[list[int]]:
    """Shared-prefix requests, then requests extending earlier prompts and their outputs."""
    first = _ids(llm.generate(prompt_token_ids=prompts, sampling_params=GREEDY,
                              use_tqdm=False))
    extended = [p + out + p[-5:] for p, out in zip(prompts[:4], first[:4])]
    second = _ids(llm.generate(prompt_token_ids=extended, sampling_params=GREEDY,
                               use_tqdm=False))
    return first + second


@pytest.fixture(scope="module")
def without_caching(smollm: LoadedModel) -> tuple[list[list[int]], LLM]:
    """The sharing workload's outputs with prefix caching off (what caching must not change),
    and the engine that made them."""
    off = LLM(loaded=smollm, kv_cache_bytes=128 << 20, enable_prefix_caching=False)
    outputs = _run_sharing(off, _sharing_workload(smollm.tokenizer))
    assert_all_blocks_free(off)
    return outputs, off


@pytest.mark.slow
def test_prefix_caching_changes_no_output_on_smollm(
        smollm: LoadedModel, without_caching: tuple[list[list[int]], LLM]) -> None:
    expected, off = without_caching
    on = LLM(loaded=smollm, kv_cache_bytes=128 << 20)
    assert _run_sharing(on, _sharing_workload(smollm.tokenizer)) == expected
    stats = on.stats()
    assert stats.prefix_cache_hit_tokens >= 7 * 288 + 4 * 300  # the prefix, then whole prompts
    assert stats.num_prefilled_tokens < off.stats().num_prefilled_tokens / 3
    assert off.stats().prefix_cache_hit_tokens == 0
    assert_all_blocks_free(on)


@pytest.mark.slow
def test_prefix_caching_under_eviction_and_preemption(
        smollm: LoadedModel, without_caching: tuple[list[list[int]], LLM]) -> None:
    prompts = _sharing_workload(smollm.tokenizer)
    expected, _ = without_caching
    block_bytes = 2 * 30 * 3 * 64 * 4 * 16  # K/V, layers, kv heads, head dim, fp32, tokens
    tight = LLM(loaded=smollm, kv_cache_bytes=30 * block_bytes, max_num_batched_tokens=512)
    assert _run_sharing(tight, prompts) == expected
    stats = tight.stats()
    assert stats.num_preemptions > 0
    assert stats.num_evictions > 0
    assert stats.prefix_cache_hit_tokens > 0
    assert_all_blocks_free(tight)


def test_prefix_caching_on_tiny_llama_with_small_blocks(tiny_llama: TinyFactory) -> None:
    loaded = load_model(str(tiny_llama()))
    shared = random_prompts(seed=5, count=1, longest=30)[0] * 2
    prompts = [shared + tail for tail in random_prompts(seed=6, count=6, longest=4)]
    results = {}
    for caching in (False, True):
        llm = LLM(loaded=loaded, kv_cache_bytes=1 << 20, block_size=4,
                  max_num_batched_tokens=40, enable_prefix_caching=caching)
        results[caching] = _run_sharing(llm, prompts)
        assert_all_blocks_free(llm)
    assert results[True] == results[False]


def test_parallel_sampling_prefills_once_and_repeats(tiny_llama: TinyFactory) -> None:
    loaded = load_model(str(tiny_llama()))
    prompt = random_prompts(seed=7, count=1, longest=12)[0] * 3
    params = SamplingParams(n=4, temperature=0.9, seed=7, max_tokens=20, ignore_eos=True)
    llm = LLM(loaded=loaded, kv_cache_bytes=4 << 20, block_size=8,
              enable_prefix_caching=False)
    first = llm.generate(prompt_token_ids=[prompt], sampling_params=params, use_tqdm=False)[0]
    stats = llm.stats()
    assert stats.num_prefilled_tokens == len(prompt)  # once, not four times
    assert stats.num_cow_copies > 0  # the shared partial block was copied on write
    again = llm.generate(prompt_token_ids=[prompt], sampling_params=params, use_tqdm=False)[0]
    assert [c.token_ids for c in first.outputs] == [c.token_ids for c in again.outputs]
    assert len({tuple(c.token_ids) for c in first.outputs}) > 1
    # Sample i of a seeded request draws from seed + i: the same as a lone request with it.
    for i, sample in enumerate(first.outputs):
        alone = SamplingParams(temperature=0.9, seed=7 + i, max_tokens=20, ignore_eos=True)
        single = llm.generate(prompt_token_ids=[prompt], sampling_params=alone,
                              use_tqdm=False)[0]
        assert single.outputs[0].token_ids == sample.token_ids
    assert_all_blocks_free(llm)


def test_parallel_sampling_survives_preemption(tiny_llama: TinyFactory) -> None:
    loaded = load_model(str(tiny_llama()))
    prompts = [[100 + i, *random_prompts(seed=8, count=1, longest=7)[0]] for i in range(6)]
    params = SamplingParams(n=3, temperature=0.8, seed=1, max_tokens=24, ignore_eos=True)
    roomy = LLM(loaded=loaded, kv_cache_bytes=4 << 20, block_size=4)
    expected = roomy.generate(prompt_token_ids=prompts, sampling_params=params, use_tqdm=False)
    block_bytes = 2 * 2 * 2 * 64 * 4 * 4
    tight = LLM(loaded=loaded, kv_cache_bytes=50 * block_bytes, block_size=4)
    got = tight.generate(prompt_token_ids=prompts, sampling_params=params, use_tqdm=False)
    assert tight.stats().num_preemptions > 0
    for a, b in zip(expected, got):
        assert [c.token_ids for c in a.outputs] == [c.token_ids for c in b.outputs]
    assert_all_blocks_free(tight)


def test_aborting_forked_requests_returns_every_block(tiny_llama: TinyFactory) -> None:
    loaded = load_model(str(tiny_llama(vocab_size=TOKENIZER_VOCAB)))  # text prompts
    core = EngineCore(EngineConfig(kv_cache_bytes=4 << 20, block_size=4), loaded)
    engine = AsyncEngine(core)

    async def take_two(params: SamplingParams, request_id: str) -> None:
        seen = 0
        async for _ in engine.generate("Abort me after two steps", params, request_id):
            seen += 1
            if seen == 2:
                break

    async def consume(params: SamplingParams, request_id: str) -> None:
        async for _ in engine.generate("Beams stream nothing until they end", params,
                                       request_id):
            pass

    async def main() -> None:
        beams = asyncio.create_task(consume(
            SamplingParams(beam_width=4, max_tokens=200, ignore_eos=True), "beam"))
        await take_two(SamplingParams(n=4, temperature=1.0, max_tokens=200, ignore_eos=True),
                       "n")
        while core.block_manager.num_shared_blocks == 0:  # the beams have forked
            await asyncio.sleep(0.01)
        beams.cancel()
        with pytest.raises(asyncio.CancelledError):
            await beams

    try:
        asyncio.run(main())
        for _ in range(200):  # the aborts reach the core thread asynchronously
            if core.block_manager.num_used_blocks == 0 and not core.requests:
                break
            time.sleep(0.01)
        assert not core.requests
        assert core.block_manager.num_used_blocks == 0
        assert all(c == 0 for c in core.block_manager.ref_counts)
    finally:
        engine.shutdown()
