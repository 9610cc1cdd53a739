"""The offline API's contract: outputs, parameter lists, chat, bad input, the CLI."""

from __future__ import annotations

import subprocess
import sys

import pytest

from pagedserve import LLM, SamplingParams
from tests.conftest import assert_all_blocks_free


@pytest.fixture(scope="module")
def llm(smollm) -> LLM:
    return LLM(loaded=smollm, kv_cache_bytes=64 * 2**20)


def test_outputs_carry_prompt_tokens_text_and_reason(llm):
    out = llm.generate("The capital of France is", SamplingParams(temperature=0, max_tokens=6),
                       use_tqdm=False)
    assert len(out) == 1
    o = out[0]
    assert o.prompt == "The capital of France is"
    assert o.prompt_token_ids == llm.tokenizer.encode("The capital of France is")
    c = o.outputs[0]
    assert len(c.token_ids) == 6 and c.finish_reason == "length" and o.finished
    assert c.text == llm.tokenizer.decode(c.token_ids, skip_special_tokens=True)
    assert c.text.startswith(" Paris")


def test_one_params_per_prompt_keeps_order(llm):
    prompts = ["One", "Two two", "Three three three"]
    params = [SamplingParams(temperature=0, max_tokens=n) for n in (3, 5, 7)]
    out = llm.generate(prompts, params, use_tqdm=False)
    assert [o.prompt for o in out] == prompts
    assert [len(o.outputs[0].token_ids) for o in out] == [3, 5, 7]
    with pytest.raises(ValueError, match="sampling_params has 2 entries for 3 prompts"):
        llm.generate(prompts, params[:2], use_tqdm=False)


def test_chat_uses_the_template(llm):
    messages = [{"role": "user", "content": "What is 2+2?"}]
    chat = llm.chat(messages, SamplingParams(temperature=0, max_tokens=12), use_tqdm=False)
    rendered = llm.tokenizer.apply_chat_template(messages, tokenize=False,
                                                 add_generation_prompt=True)
    plain = llm.generate(rendered, SamplingParams(temperature=0, max_tokens=12), use_tqdm=False)
    assert chat[0].prompt == rendered
    assert chat[0].outputs[0].token_ids == plain[0].outputs[0].token_ids


def test_bad_prompt_queues_nothing(llm):
    with pytest.raises(ValueError, match="prompt must not be empty"):
        llm.generate(["fine", ""], SamplingParams(max_tokens=2), use_tqdm=False)
    with pytest.raises(ValueError, match="outside the vocabulary"):
        llm.generate(prompt_token_ids=[[1, 2, 10**7]], use_tqdm=False)
    assert not llm.engine.requests
    assert_all_blocks_free(llm)
    assert llm.generate("still works", SamplingParams(max_tokens=2), use_tqdm=False)


def test_progress_bar_for_many_prompts(llm, capsys):
    llm.generate(["a", "b", "c"], SamplingParams(temperature=0, max_tokens=2))
    assert "Generating" in capsys.readouterr().err


def test_bad_model_path_is_a_clear_error(tmp_path):
    with pytest.raises(FileNotFoundError, match="neither a Hugging Face directory"):
        LLM(str(tmp_path / "missing"))


@pytest.mark.slow  # a process of its own loads the model
def test_cli_generate_prints_the_greedy_completion(llm, smollm):
    expected = llm.generate("The capital of France is",
                            SamplingParams(temperature=0, max_tokens=8),
                            use_tqdm=False)[0].outputs[0].text
    run = subprocess.run([sys.executable, "-m", "pagedserve", "generate",
                          "The capital of France is", "--max-tokens", "8",
                          "--model", smollm.path], capture_output=True, text=True, timeout=300)
    assert run.returncode == 0, run.stderr
    assert run.stdout == expected + "\n"


def test_reset_prefix_cache_makes_a_rerun_compute_its_prompt(llm):
    prompt = [int(t) for t in range(1000, 1100)]
    params = SamplingParams(max_tokens=2, temperature=0)
    first = llm.generate(prompt_token_ids=[prompt], sampling_params=params, use_tqdm=False)
    before = llm.stats()
    llm.generate(prompt_token_ids=[prompt], sampling_params=params, use_tqdm=False)
    cached = llm.stats()
    assert cached.prefix_cache_hit_tokens - before.prefix_cache_hit_tokens == 96
    assert llm.reset_prefix_cache()
    again = llm.generate(prompt_token_ids=[prompt], sampling_params=params, use_tqdm=False)
    after = llm.stats()
    assert after.prefix_cache_hit_tokens == cached.prefix_cache_hit_tokens
    assert after.num_prefilled_tokens - cached.num_prefilled_tokens == 100
    assert again[0].outputs[0].token_ids == first[0].outputs[0].token_ids
    assert_all_blocks_free(llm)
