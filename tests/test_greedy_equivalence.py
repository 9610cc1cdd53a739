"""Greedy outputs are token-identical to transformers' generate, whatever the batching."""

from __future__ import annotations

import random

import pytest

from pagedserve import LLM, SamplingParams
from pagedserve.model.loader import LoadedModel
from tests.conftest import assert_all_blocks_free, hf_greedy
from tests.prompts import PROMPTS, TINY_VOCAB

MAX_NEW = 16
LONG_PROMPT = 17  # the prompt of more than 512 tokens


@pytest.fixture(scope="module")
def prompt_ids(smollm: LoadedModel) -> list[list[int]]:
    ids = [smollm.tokenizer.encode(p) for p in PROMPTS]
    assert len(ids[LONG_PROMPT]) > 512, "the set must hold a prompt longer than 512 tokens"
    return ids


@pytest.fixture(scope="module")
def reference(hf_smollm, prompt_ids) -> list[list[int]]:
    return [hf_greedy(hf_smollm, ids, MAX_NEW) for ids in prompt_ids]


def _run(llm: LLM, batch: list[list[int]]) -> list[list[int]]:
    params = SamplingParams(temperature=0.0, max_tokens=MAX_NEW)
    outputs = llm.generate(prompt_token_ids=batch, sampling_params=params, use_tqdm=False)
    return [o.outputs[0].token_ids for o in outputs]


def _check_batches(llm: LLM, prompt_ids, reference, batch_size: int) -> None:
    # Mixed prompt lengths in every batch: indices cycle through the whole varied set. One at a
    # time, a sample of it (the long prompt included) shows the same: decoding alone is the
    # slowest way through the set and adds no case the sample lacks.
    order = [i % len(prompt_ids) for i in range(max(batch_size, len(prompt_ids)))]
    if batch_size == 1:
        order = sorted({*order[::4], LONG_PROMPT})
    for start in range(0, len(order), batch_size):
        chunk = order[start: start + batch_size]
        got = _run(llm, [prompt_ids[i] for i in chunk])
        for i, tokens in zip(chunk, got):
            assert tokens == reference[i], f"prompt {i} differs at batch size {batch_size}"
    assert_all_blocks_free(llm)


@pytest.mark.slow
# Mid-size batches are the tiny models' case below; here the extremes.
@pytest.mark.parametrize("batch_size", [1, 32])
def test_smollm_matches_transformers(smollm, prompt_ids, reference, batch_size):
    llm = LLM(loaded=smollm, kv_cache_bytes=256 * 2**20)
    _check_batches(llm, prompt_ids, reference, batch_size)


def test_smollm_small_chunked_prefill_and_preemption(smollm, prompt_ids, reference):
    # One pass over the set for both: a 37-token step budget splits every longer prompt into
    # chunks, and a 64-block cache (the long prompt alone nearly fills it) forces preemptions,
    # whose sequences are prefilled again in chunks.
    block_bytes = 2 * 30 * 3 * 64 * 4 * 16
    llm = LLM(loaded=smollm, kv_cache_bytes=64 * block_bytes, max_num_batched_tokens=37)
    _check_batches(llm, prompt_ids, reference, 32)
    stats = llm.stats()
    # The long prompt alone needs many chunks.
    assert stats.num_steps > len(prompt_ids[LONG_PROMPT]) // 37
    assert stats.num_preemptions > 0


@pytest.mark.slow
@pytest.mark.parametrize("heads,kv_heads,head_dim", [
    (4, 2, 64),   # grouped-query attention, head size 64
    (4, 1, 128),  # multi-query, head size 128
    (2, 2, 128),  # plain multi-head attention
])
def test_tiny_llama_matches_transformers(tiny_llama, heads, kv_heads, head_dim, smollm):
    from transformers import AutoModelForCausalLM

    path = tiny_llama(num_heads=heads, num_kv_heads=kv_heads, head_dim=head_dim)
    hf = AutoModelForCausalLM.from_pretrained(path, dtype="float32").eval()
    gen = __import__("random").Random(heads * 1000 + head_dim)
    prompts = [[gen.randrange(3, TINY_VOCAB) for _ in range(gen.randint(1, 300))]
               for _ in range(32)]
    reference = [hf_greedy(hf, p, 16) for p in prompts]
    params = SamplingParams(temperature=0.0, max_tokens=16)
    settings = [dict(), dict(max_num_batched_tokens=50),
                dict(kv_cache_bytes=2 * 2 * kv_heads * head_dim * 4 * 16 * 60,
                     max_num_batched_tokens=128)]
    for extra in settings:
        llm = LLM(str(path), **{"kv_cache_bytes": 64 * 2**20, **extra})
        # Chunking and preemption act on the full batch; mid-size batches once suffice.
        for batch_size in (1, 7, 32) if not extra else (1, 32):
            for start in range(0, 32, batch_size):
                chunk = prompts[start: start + batch_size] if batch_size < 32 else prompts
                outs = llm.generate(prompt_token_ids=chunk, sampling_params=params,
                                    use_tqdm=False)
                for p, o in zip(chunk, outs):
                    assert o.outputs[0].token_ids == reference[prompts.index(p)], extra
                if batch_size == 1 and start >= 7:
                    break  # batch size 1 over a few prompts is enough per setting
        assert_all_blocks_free(llm)
        if "max_num_batched_tokens" in extra and extra["max_num_batched_tokens"] == 128:
            assert llm.stats().num_preemptions > 0


@pytest.mark.parametrize("quantization", ["int8", "int4"])
def test_tiny_llama_quantized_outputs_do_not_depend_on_batching(tiny_llama,
                                                                quantization: str) -> None:
    """Quantized weights run the block kernels (Q8_0, Q4_1) on 8-bit activations, which
    transformers does not have: a request's greedy tokens are held to the same engine's one at
    a time, in a batch of mixed lengths and prefilled in chunks (the kernels give each row the
    same result whatever the rows beside it).

    Not preemption, nor prefix-cache hits on generated tokens: there a token's keys and values
    are recomputed by a prefill where a decode step first wrote them, which rounds differently
    in fp32 (a few 1e-6 relative); the 8-bit rounding of the activations before every quantized
    projection can turn that into a step of their codes, and near-ties then flip greedy picks.
    The fp32 engine is held to those schedules against transformers."""
    path = str(tiny_llama())
    gen = random.Random(7)
    prompts = [[gen.randrange(3, TINY_VOCAB) for _ in range(gen.randint(1, 80))] for _ in range(6)]
    params = SamplingParams(temperature=0.0, max_tokens=12, ignore_eos=True)

    def run(llm: LLM, batch: list[list[int]]) -> list[list[int]]:
        outputs = llm.generate(prompt_token_ids=batch, sampling_params=params, use_tqdm=False)
        return [o.outputs[0].token_ids for o in outputs]

    llm = LLM(path, kv_cache_bytes=16 << 20, quantization=quantization)
    alone = [run(llm, [p])[0] for p in prompts]
    assert run(llm, prompts) == alone
    chunked = LLM(path, kv_cache_bytes=16 << 20, max_num_batched_tokens=30,
                  quantization=quantization)
    assert run(chunked, prompts) == alone
    stats = chunked.stats()
    assert stats.num_steps > sum(len(p) for p in prompts) // 30  # prompts split over steps
    assert stats.num_preemptions == 0
    assert_all_blocks_free(chunked)
