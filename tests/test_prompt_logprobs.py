"""``SamplingParams.prompt_logprobs``: every prompt token's logprob and the most likely tokens at
its position, equal to transformers' scores of the prompt, however the prompt is computed
(in chunks, again after a preemption) and never taken from the prefix cache."""

from __future__ import annotations

import pytest
import torch
from transformers import AutoModelForCausalLM

from pagedserve import LLM, SamplingParams
from pagedserve.model.loader import LoadedModel, load_model
from tests.conftest import TinyFactory, assert_all_blocks_free
from tests.prompts import random_prompts

TOP = 3


@pytest.fixture(scope="module")
def tiny(tiny_llama: TinyFactory) -> tuple[LoadedModel, torch.nn.Module]:
    path = tiny_llama()
    hf = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).eval()
    return load_model(str(path)), hf


def _reference(hf: torch.nn.Module, ids: list[int]) -> torch.Tensor:
    with torch.inference_mode():
        return torch.log_softmax(hf(torch.tensor([ids])).logits[0].float(), dim=-1)


def _check(outputs: list, prompts: list[list[int]], hf: torch.nn.Module) -> None:
    for out, ids in zip(outputs, prompts):
        got = out.prompt_logprobs
        assert got is not None and len(got) == len(ids) and got[0] is None
        reference = _reference(hf, ids)
        for i in range(1, len(ids)):
            position = got[i]
            assert position[ids[i]] == pytest.approx(reference[i - 1, ids[i]].item(), abs=1e-4)
            top = reference[i - 1].topk(TOP)
            for token, value in zip(top.indices.tolist(), top.values.tolist()):
                assert position[token] == pytest.approx(value, abs=1e-4)
            assert len(position) in (TOP, TOP + 1)  # the top ones and the prompt's own token


def test_prompt_logprobs_equal_transformers_in_chunks_and_after_preemption(
        tiny: tuple[LoadedModel, torch.nn.Module]) -> None:
    loaded, hf = tiny
    prompts = random_prompts(seed=21, count=6, longest=90)
    params = SamplingParams(temperature=0, max_tokens=24, ignore_eos=True,
                            prompt_logprobs=TOP)
    block_bytes = 2 * 2 * 2 * 64 * 4 * 4  # layers, K/V, kv heads, head dim, fp32, tokens
    for settings in ({"max_num_batched_tokens": 33},  # prompts in chunks
                     {"kv_cache_bytes": 40 * block_bytes}):  # preemptions
        llm = LLM(loaded=loaded, block_size=4, **{"kv_cache_bytes": 8 << 20, **settings})
        outputs = llm.generate(prompt_token_ids=prompts, sampling_params=params,
                               use_tqdm=False)
        _check(outputs, prompts, hf)
        if "kv_cache_bytes" in settings:
            assert llm.stats().num_preemptions > 0
        assert_all_blocks_free(llm)


def test_prompt_logprobs_skip_the_prefix_cache(tiny: tuple[LoadedModel, torch.nn.Module]
                                               ) -> None:
    loaded, hf = tiny
    llm = LLM(loaded=loaded, block_size=4, kv_cache_bytes=8 << 20)
    prompt = random_prompts(seed=22, count=1, longest=60)[0] + [7] * 20
    plain = SamplingParams(temperature=0, max_tokens=2)
    scored = SamplingParams(temperature=0, max_tokens=2, prompt_logprobs=0)
    first = llm.generate(prompt_token_ids=[prompt], sampling_params=plain, use_tqdm=False)[0]
    assert first.num_cached_tokens == 0 and first.prompt_logprobs is None
    again = llm.generate(prompt_token_ids=[prompt], sampling_params=plain, use_tqdm=False)[0]
    assert again.num_cached_tokens >= len(prompt) - 4  # the prompt's whole blocks
    outs = llm.generate(prompt_token_ids=[prompt, prompt], sampling_params=[scored, plain],
                        use_tqdm=False)
    assert outs[0].num_cached_tokens == 0  # computed in full, for its logprobs
    reference = _reference(hf, prompt)
    for i in range(1, len(prompt)):
        # prompt_logprobs=0: the prompt's own token alone.
        assert outs[0].prompt_logprobs[i] == {
            prompt[i]: pytest.approx(reference[i - 1, prompt[i]].item(), abs=1e-4)}
    assert outs[0].outputs[0].token_ids == first.outputs[0].token_ids
    assert_all_blocks_free(llm)


def test_prompt_logprobs_with_parallel_samples(tiny: tuple[LoadedModel, torch.nn.Module]
                                               ) -> None:
    loaded, hf = tiny
    llm = LLM(loaded=loaded, block_size=4, kv_cache_bytes=8 << 20)
    prompt = random_prompts(seed=23, count=1, longest=40)[0]
    out = llm.generate(prompt_token_ids=[prompt], use_tqdm=False, sampling_params=SamplingParams(
        n=3, temperature=0.8, seed=5, max_tokens=6, prompt_logprobs=TOP))[0]
    assert len(out.outputs) == 3
    _check([out], [prompt], hf)


@pytest.mark.parametrize(("values", "field"), [
    ({"prompt_logprobs": -1}, "prompt_logprobs"),
    ({"prompt_logprobs": 1.5}, "prompt_logprobs"),
    ({"prompt_logprobs": 1, "beam_width": 2}, "prompt_logprobs"),
])
def test_bad_prompt_logprobs_are_refused(values: dict[str, object], field: str) -> None:
    with pytest.raises(ValueError, match=f"SamplingParams.{field}"):
        SamplingParams(**values)  # type: ignore[arg-type]


def test_prompt_logprobs_are_bounded_by_max_logprobs(
        tiny: tuple[LoadedModel, torch.nn.Module]) -> None:
    llm = LLM(loaded=tiny[0], block_size=4, kv_cache_bytes=8 << 20, max_logprobs=5)
    with pytest.raises(ValueError, match="prompt_logprobs is 6, more than the engine's "
                                         r"max_logprobs \(5\)"):
        llm.generate(prompt_token_ids=[[5, 6, 7]], use_tqdm=False,
                     sampling_params=SamplingParams(prompt_logprobs=6))
