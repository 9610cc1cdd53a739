"""Structured outputs on the engine's other paths, and around the steps: preemption with chunked
prefill and speculation keep the greedy outputs of a plain engine; the async engine compiles off
the step thread and refuses before any output; the mask itself against its reference.
"""

from __future__ import annotations

import asyncio
import json
import threading
from typing import Any

import jsonschema
import pytest
import torch

from pagedserve import LLM, EngineConfig, SamplingParams, StructuredOutputsParams
from pagedserve.engine.async_engine import AsyncEngine
from pagedserve.engine.core import EngineCore
from pagedserve.engine.structured_output import compiler as compiler_module
from pagedserve.kernels.token_bitmask import apply_token_bitmask, mask_rows_
from pagedserve.model.loader import LoadedModel
from tests.conftest import assert_all_blocks_free
from tests.test_structured_outputs import SCHEMAS, chat, constrained


@pytest.fixture(scope="module")
def llm(smollm: LoadedModel) -> LLM:
    return LLM(loaded=smollm, kv_cache_bytes=128 << 20)


# ---- the engine's other paths keep to it -------------------------------------------------------

def _greedy_json(llm: LLM, count: int, prompt_words: int = 0) -> list[list[int]]:
    filler = " ".join(f"word{i}" for i in range(prompt_words))
    prompts = [chat(llm, f"{filler} Write JSON person {i}.") for i in range(count)]
    params = constrained(temperature=0.0, max_tokens=96, json=SCHEMAS["person"])
    outputs = llm.generate(prompts, params, use_tqdm=False)
    for o in outputs:
        assert o.outputs[0].finish_reason == "stop"
        jsonschema.validate(json.loads(o.outputs[0].text), SCHEMAS["person"])
    return [o.outputs[0].token_ids for o in outputs]


@pytest.mark.slow
def test_preemption_and_chunked_prefill_keep_greedy_outputs(llm: LLM,
                                                            smollm: LoadedModel) -> None:
    expected = _greedy_json(llm, 4, prompt_words=120)
    block_bytes = 2 * 30 * 3 * 64 * 4 * 16  # K/V, layers, kv heads, head dim, fp32, tokens
    tight = LLM(loaded=smollm, kv_cache_bytes=40 * block_bytes, max_num_batched_tokens=96)
    assert _greedy_json(tight, 4, prompt_words=120) == expected
    assert tight.stats().num_preemptions > 0
    assert_all_blocks_free(tight)


def test_speculation_checks_drafts_against_the_grammar(llm: LLM, smollm: LoadedModel) -> None:
    expected = _greedy_json(llm, 3)
    spec = LLM(loaded=smollm, kv_cache_bytes=128 << 20, speculative_config={
        "method": "ngram", "num_speculative_tokens": 4, "prompt_lookup_max": 3,
        "prompt_lookup_min": 1})
    assert _greedy_json(spec, 3) == expected
    stats = spec.stats()
    assert stats.spec_decode_num_draft_tokens > stats.spec_decode_num_accepted_tokens > 0
    assert_all_blocks_free(spec)


# ---- the async engine: compiled off the step thread -------------------------------------------

async def _collect(engine: AsyncEngine, prompt: str, params: SamplingParams) -> str:
    text = ""
    async for output in engine.generate(prompt, params):
        text = output.outputs[0].text
    return text


def test_a_slow_compile_stalls_no_other_request(smollm: LoadedModel,
                                                monkeypatch: pytest.MonkeyPatch) -> None:
    release = threading.Event()
    compiling = threading.Event()
    real = compiler_module.StructuredOutputCompiler._compile

    def slow(self: Any, params: StructuredOutputsParams) -> Any:
        compiling.set()
        release.wait()
        return real(self, params)

    monkeypatch.setattr(compiler_module.StructuredOutputCompiler, "_compile", slow)
    engine = AsyncEngine(EngineCore(EngineConfig(kv_cache_bytes=64 << 20), smollm))

    async def scenario() -> tuple[str, str]:
        slow_one = asyncio.ensure_future(_collect(engine, "Pick.", constrained(
            temperature=0.0, choice=["left", "right"])))
        await asyncio.get_running_loop().run_in_executor(None, compiling.wait)
        # The constrained request waits for its grammar; a free one runs to its end.
        free = await _collect(engine, "Hello", SamplingParams(temperature=0.0, max_tokens=8))
        assert not slow_one.done()
        release.set()
        return free, await slow_one

    try:
        free, chosen = asyncio.run(scenario())
    finally:
        release.set()
        engine.shutdown()
    assert free
    assert chosen in ("left", "right")


def test_async_refusals_come_before_any_output(smollm: LoadedModel) -> None:
    engine = AsyncEngine(EngineCore(EngineConfig(kv_cache_bytes=64 << 20), smollm))

    async def scenario() -> None:
        with pytest.raises(ValueError, match=r"structured_outputs\.regex"):
            await _collect(engine, "Hi", constrained(regex="(unclosed"))
        assert engine.in_flight == 0
        assert await _collect(engine, "Hi", constrained(temperature=0.0, choice=["ok"])) == "ok"

    try:
        asyncio.run(scenario())
    finally:
        engine.shutdown()
    assert not any(t.name.startswith("grammar-compile") for t in threading.enumerate())


# ---- the mask itself ------------------------------------------------------------------------

def test_token_bitmask_masks_exactly_the_cleared_bits() -> None:
    generator = torch.Generator().manual_seed(0)
    vocab = 100  # not a multiple of 32: the last word's high bits lie past the vocabulary
    logits = torch.randn(3, vocab, generator=generator)
    bitmask = torch.randint(-2**31, 2**31 - 1, (3, 4), generator=generator, dtype=torch.int32)
    masked = apply_token_bitmask(logits, bitmask)
    for row in range(3):
        for token in range(vocab):
            allowed = (int(bitmask[row, token // 32]) >> (token % 32)) & 1
            assert masked[row, token] == (logits[row, token] if allowed else float("-inf"))


def test_masking_rows_in_place_equals_the_reference() -> None:
    generator = torch.Generator().manual_seed(1)
    vocab = 1000
    logits = torch.randn(5, vocab, generator=generator)
    bitmask = torch.randint(-2**31, 2**31 - 1, (5, 32), generator=generator, dtype=torch.int32)
    rows = [0, 3, 4]
    masked = logits.clone()
    mask_rows_(masked, bitmask, rows)  # xgrammar's CPU kernel
    reference = apply_token_bitmask(logits, bitmask)
    assert torch.equal(masked[rows], reference[rows])
    assert torch.equal(masked[[1, 2]], logits[[1, 2]])  # the other rows untouched
    as_bf16 = logits.bfloat16()  # the torch path
    mask_rows_(as_bf16, bitmask, rows)
    assert torch.equal(as_bf16[rows], apply_token_bitmask(logits.bfloat16(), bitmask)[rows])
