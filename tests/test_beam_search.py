"""Beam search equals transformers' ``generate(num_beams=k, do_sample=False)``: same best
sequences, scores within 1e-4, on the embedded model and on tiny random Llamas."""

from __future__ import annotations

import pytest
import torch
from transformers import AutoModelForCausalLM

from pagedserve import LLM, SamplingParams
from pagedserve.model.loader import LoadedModel, load_model
from tests.conftest import TinyFactory, assert_all_blocks_free
from tests.prompts import random_prompts


def hf_beams(model: torch.nn.Module, prompt_ids: list[int], width: int, n: int,
             max_new_tokens: int, length_penalty: float, early_stopping: bool | str,
             eos: int) -> list[tuple[list[int], float]]:
    """transformers' best ``n`` beams: (generated ids through the first EOS, score)."""
    with torch.inference_mode():
        out = model.generate(
            torch.tensor([prompt_ids]), attention_mask=torch.ones(1, len(prompt_ids),
                                                                  dtype=torch.long),
            max_new_tokens=max_new_tokens, do_sample=False, num_beams=width,
            num_return_sequences=n, length_penalty=length_penalty,
            early_stopping=early_stopping, output_scores=True, return_dict_in_generate=True,
            pad_token_id=eos, eos_token_id=eos)
    beams = []
    for ids, score in zip(out.sequences[:, len(prompt_ids):].tolist(),
                          out.sequences_scores.tolist()):
        if eos in ids:
            ids = ids[: ids.index(eos) + 1]
        beams.append((ids, score))
    return beams


def check_against_hf(llm: LLM, hf: torch.nn.Module, prompts: list[list[int]], width: int,
                     n: int, max_tokens: int, length_penalty: float = 1.0,
                     early_stopping: bool | str = False) -> None:
    params = SamplingParams(beam_width=width, n=n, max_tokens=max_tokens,
                            length_penalty=length_penalty, early_stopping=early_stopping)
    outputs = llm.generate(prompt_token_ids=prompts, sampling_params=params, use_tqdm=False)
    eos = llm.engine.eos_token_id
    assert eos is not None
    for prompt, output in zip(prompts, outputs):
        expected = hf_beams(hf, prompt, width, n, max_tokens, length_penalty, early_stopping,
                            eos)
        assert [c.token_ids for c in output.outputs] == [ids for ids, _ in expected]
        for c, (ids, hf_score) in zip(output.outputs, expected):
            # Scores are cumulative log-probs divided by length ** length_penalty: the sums
            # agree within 1e-4, the scores within 1e-4 times that divisor's inverse (a
            # negative penalty multiplies the score by the length).
            scale = len(ids) ** length_penalty
            assert c.cumulative_logprob == pytest.approx(hf_score * scale, abs=1e-4)
            assert c.score == pytest.approx(hf_score, abs=1e-4 / min(1.0, scale))
            assert c.score == pytest.approx(c.cumulative_logprob / scale, rel=1e-6)
            assert c.finish_reason == ("stop" if c.token_ids[-1] == eos else "length")
    assert_all_blocks_free(llm)


@pytest.fixture(scope="module")
def chat_prompts(smollm: LoadedModel) -> list[list[int]]:
    questions = ["What is the capital of France?", "Name a primary color.",
                 "Say hello in Spanish."]
    return [smollm.tokenizer.apply_chat_template([{"role": "user", "content": q}],
                                                 add_generation_prompt=True, tokenize=True,
                                                 return_dict=False)
            for q in questions]


@pytest.mark.slow
# Width 2 is the tiny model's case (below) too; on SmolLM2 the wider ones.
@pytest.mark.parametrize("width", [4, 8])
def test_beam_search_matches_transformers_on_smollm(smollm: LoadedModel,
                                                    hf_smollm: torch.nn.Module,
                                                    chat_prompts: list[list[int]],
                                                    width: int) -> None:
    llm = LLM(loaded=smollm, kv_cache_bytes=96 << 20)
    check_against_hf(llm, hf_smollm, chat_prompts, width, n=min(width, 2), max_tokens=16)


@pytest.mark.slow
@pytest.mark.parametrize(("length_penalty", "early_stopping"),
                         [(0.0, True), (2.0, "never"), (-1.0, False)])
def test_beam_search_length_penalty_and_early_stopping(
        smollm: LoadedModel, hf_smollm: torch.nn.Module, chat_prompts: list[list[int]],
        length_penalty: float, early_stopping: bool | str) -> None:
    llm = LLM(loaded=smollm, kv_cache_bytes=96 << 20)
    check_against_hf(llm, hf_smollm, chat_prompts[:2], 4, n=4, max_tokens=20,
                     length_penalty=length_penalty, early_stopping=early_stopping)


@pytest.mark.parametrize("width", [2, 4, 8])
def test_beam_search_matches_transformers_on_tiny_llama(tiny_llama: TinyFactory,
                                                        width: int) -> None:
    path = tiny_llama(num_heads=4, num_kv_heads=2, head_dim=64)
    hf = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).eval()
    loaded = load_model(str(path))
    llm = LLM(loaded=loaded, kv_cache_bytes=8 << 20, block_size=4)
    prompts = random_prompts(seed=3, count=3, longest=16)
    check_against_hf(llm, hf, prompts, width, n=width, max_tokens=12)


def test_beam_search_under_preemption_matches_roomy_cache(tiny_llama: TinyFactory) -> None:
    """A cache too small for all requests at once forces whole beam groups out and back."""
    path = tiny_llama(num_heads=4, num_kv_heads=2, head_dim=64)
    loaded = load_model(str(path))
    prompts = [[100 + i, *random_prompts(seed=4, count=1, longest=9)[0]] for i in range(6)]
    params = SamplingParams(beam_width=4, n=4, max_tokens=16)
    roomy = LLM(loaded=loaded, kv_cache_bytes=8 << 20, block_size=4)
    expected = roomy.generate(prompt_token_ids=prompts, sampling_params=params, use_tqdm=False)
    block_bytes = 2 * 2 * 2 * 64 * 4 * 4  # layers, K/V, kv heads, head dim, tokens, fp32
    tight = LLM(loaded=loaded, kv_cache_bytes=40 * block_bytes, block_size=4)
    got = tight.generate(prompt_token_ids=prompts, sampling_params=params, use_tqdm=False)
    assert tight.stats().num_preemptions > 0
    for a, b in zip(expected, got):
        assert [c.token_ids for c in a.outputs] == [c.token_ids for c in b.outputs]
    assert_all_blocks_free(tight)
