"""Every model family against transformers on tiny random-weight models: greedy outputs
token-identical (mixed batch, chunked prefill, forced preemption), per-layer hidden states,
GGUF and safetensors alike, the C kernels in use, and Mistral's KV blocks bounded by its window."""

from __future__ import annotations

from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
import torch
from transformers import (
    AutoModelForCausalLM,
    FalconConfig,
    LlamaConfig,
    MistralConfig,
    Qwen2Config,
    Qwen3Config,
)

from pagedserve import LLM, SamplingParams
from pagedserve.kernels import cpu
from pagedserve.model.loader import LoadedModel, load_model
from pagedserve.model.registry import UnsupportedModelError
from pagedserve.model.runner import kv_block_bytes
from tests.conftest import assert_all_blocks_free, hf_greedy
from tests.gguf_files import write_gguf
from tests.prompts import TINY_VOCAB, random_prompts

MAX_NEW = 6
WINDOW = 24  # Mistral's sliding window: shorter than the longer prompts

# name: (config class, shape). 2 layers, hidden 64 (72 for three heads of 24).
FAMILIES: dict[str, tuple[Any, dict[str, Any]]] = {
    "llama": (LlamaConfig, dict(num_attention_heads=4, num_key_value_heads=2, head_dim=16)),
    "mistral-window": (MistralConfig, dict(num_attention_heads=4, num_key_value_heads=2,
                                           head_dim=16, sliding_window=WINDOW)),
    "qwen2-mqa-odd-tied": (Qwen2Config, dict(hidden_size=72, num_attention_heads=3,
                                             num_key_value_heads=1, tie_word_embeddings=True)),
    "qwen3-gqa": (Qwen3Config, dict(num_attention_heads=4, num_key_value_heads=2, head_dim=32)),
    "falcon-rotary-mqa": (FalconConfig, dict(num_attention_heads=4, multi_query=True,
                                             parallel_attn=True, bias=False)),
    "falcon-alibi-mha": (FalconConfig, dict(num_attention_heads=4, multi_query=False,
                                            parallel_attn=False, alibi=True, bias=True)),
    "falcon-new-arch-gqa": (FalconConfig, dict(num_attention_heads=4, num_kv_heads=2,
                                               new_decoder_architecture=True, bias=False)),
}


@dataclass
class Tiny:
    path: Path
    loaded: LoadedModel  # for the engine
    hf: torch.nn.Module  # transformers' implementation: the reference


@pytest.fixture(scope="module")
def tiny_model(tmp_path_factory: pytest.TempPathFactory,
               smollm: LoadedModel) -> Iterator[Callable[[str], Tiny]]:
    """Builds (once per family) a random-weight model saved as a Hugging Face directory with
    SmolLM2's tokenizer, and loads it for the engine and for transformers."""
    made: dict[str, Tiny] = {}
    tok = smollm.tokenizer

    def make(name: str) -> Tiny:
        if name not in made:
            config_class, shape = FAMILIES[name]
            torch.manual_seed(0)
            shape = {"hidden_size": 64, **shape}
            config = config_class(
                vocab_size=TINY_VOCAB, intermediate_size=128, num_hidden_layers=2,
                max_position_embeddings=512, initializer_range=0.15,
                bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id,
                pad_token_id=tok.eos_token_id, **shape)
            path = tmp_path_factory.mktemp(name)
            AutoModelForCausalLM.from_config(config).save_pretrained(path)
            tok.save_pretrained(path)
            hf = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).eval()
            made[name] = Tiny(path, load_model(str(path)), hf)
        return made[name]

    yield make



@pytest.fixture
def kernel_calls(monkeypatch: pytest.MonkeyPatch) -> dict[str, int]:
    """Counts the calls of each C kernel while a test runs."""
    counts: dict[str, int] = {}

    def counting(name: str, kernel: Callable[..., Any]) -> Callable[..., Any]:
        def counted(*args: Any, **kwargs: Any) -> Any:
            counts[name] = counts.get(name, 0) + 1
            return kernel(*args, **kwargs)
        return counted

    for name in ("decode_attention", "add_rms_norm", "add_layer_norm", "rotary_write_kv"):
        monkeypatch.setattr(cpu, name, counting(name, getattr(cpu, name)))
    return counts


@pytest.mark.parametrize("family", list(FAMILIES))
def test_greedy_matches_transformers(family: str, tiny_model, kernel_calls) -> None:
    tiny = tiny_model(family)
    loaded = tiny.loaded
    prompts = random_prompts(len(family), 4, 40)
    reference = [hf_greedy(tiny.hf, p, MAX_NEW) for p in prompts]
    params = SamplingParams(temperature=0.0, max_tokens=MAX_NEW)
    llm = LLM(loaded=loaded, dtype="float32", kv_cache_bytes=2**22)
    # The whole batch at once; then prefill in chunks of 16 tokens into a cache of 13 blocks of
    # 4, which holds the longest sequence but not the batch (preemption).
    small = {"block_size": 4, "kv_cache_bytes": 14 * kv_block_bytes(llm.engine.model, 4),
             "max_num_batched_tokens": 16}
    for settings in ({}, small):
        if settings:
            llm = LLM(loaded=loaded, dtype="float32", **settings)
        outputs = llm.generate(prompt_token_ids=prompts, sampling_params=params, use_tqdm=False)
        assert [o.outputs[0].token_ids for o in outputs] == reference, settings
        assert_all_blocks_free(llm)
    assert llm.stats().num_preemptions > 0
    norm = "add_layer_norm" if family.startswith("falcon") else "add_rms_norm"
    assert kernel_calls.get("decode_attention", 0) > 0 and kernel_calls.get(norm, 0) > 0
    assert (kernel_calls.get("rotary_write_kv", 0) > 0) == ("alibi" not in family)


@pytest.mark.parametrize("family", list(FAMILIES))
def test_hidden_states_match_transformers(family: str, tiny_model,
                                          monkeypatch: pytest.MonkeyPatch) -> None:
    """Every layer's output, prefill (in chunks over cached context) and decode, to 1e-5."""
    tiny = tiny_model(family)
    llm = LLM(loaded=tiny.loaded, dtype="float32", kv_cache_bytes=2**22,
              max_num_batched_tokens=16)
    model = llm.engine.model
    steps: list[list[torch.Tensor]] = []
    final: list[torch.Tensor] = []
    forward = type(model).forward

    def capture(*args: Any, **kwargs: Any) -> torch.Tensor:
        steps.append([])
        final.append(forward(model, *args, hidden_states=steps[-1], **kwargs))
        return final[-1]

    monkeypatch.setattr(model, "forward", capture)
    prompt = random_prompts(7, 1, 40)[0] + [5] * 40  # longer than the window
    out = llm.generate(prompt_token_ids=[prompt], use_tqdm=False,
                       sampling_params=SamplingParams(temperature=0.0, max_tokens=3))
    tokens = prompt + out[0].outputs[0].token_ids[:-1]  # the last one was never fed back
    assert len(steps) > 3  # several prefill chunks, then decodes
    ours = [torch.cat(layer) for layer in zip(*steps)] + [torch.cat(final)]
    with torch.no_grad():
        theirs = tiny.hf(torch.tensor([tokens]), output_hidden_states=True).hidden_states
    # transformers gives the embeddings, each layer's output but the last, then the final norm.
    for i, (a, b) in enumerate(zip(ours[:-2] + ours[-1:], theirs)):
        error = float((a - b[0]).norm() / b[0].norm())
        assert error < 1e-5, f"hidden state {i}: relative error {error:.2e}"


@pytest.mark.parametrize("family", ["llama", "qwen2-mqa-odd-tied"])
def test_gguf_gives_the_outputs_of_safetensors(family: str, tiny_model, tmp_path: Path,
                                               monkeypatch: pytest.MonkeyPatch) -> None:
    path = tiny_model(family).path
    gguf = write_gguf(path, tmp_path / f"{family}.gguf")
    monkeypatch.setenv("PAGEDSERVE_CACHE", str(tmp_path / "cache"))  # its conversion
    prompts = random_prompts(3, 4, 40)
    params = SamplingParams(temperature=0.0, max_tokens=MAX_NEW)
    runs = [LLM(source, dtype="float32", kv_cache_bytes=2**22).generate(
        prompt_token_ids=prompts, sampling_params=params, use_tqdm=False)
        for source in (str(gguf), str(path))]
    assert [[o.outputs[0].token_ids for o in run] for run in runs] == \
        [[o.outputs[0].token_ids for o in runs[1]]] * 2


def test_sliding_window_keeps_blocks_per_sequence_bounded(tiny_model) -> None:
    tiny = tiny_model("mistral-window")
    prompts = random_prompts(11, 2, 30)
    new_tokens = 2 * WINDOW
    reference = [hf_greedy(tiny.hf, p, new_tokens) for p in prompts]
    block_size = 4
    llm = LLM(loaded=tiny.loaded, dtype="float32", kv_cache_bytes=2**22, block_size=block_size,
              max_num_batched_tokens=2 * block_size)
    params = SamplingParams(temperature=0.0, max_tokens=new_tokens, ignore_eos=True)
    for i, p in enumerate(prompts):
        llm.engine.add_request(llm.engine.make_request(str(i), None, params, p))
    most, outputs = 0, {}
    while llm.engine.has_unfinished_requests:
        for out in llm.engine.step():
            if out.finished:
                outputs[out.request_id] = out.outputs[0].token_ids
        for request in llm.engine.scheduler.running:
            for seq in request.live_seqs:
                most = max(most, sum(b != 0 for b in seq.block_table.blocks))
    # The window, the block its oldest token sits in, and the block being written.
    assert most <= WINDOW // block_size + 2
    assert new_tokens > WINDOW
    for i, ref in enumerate(reference):
        assert outputs[str(i)][:len(ref)] == ref
    assert_all_blocks_free(llm)


def test_unsupported_architectures_are_named(tmp_path: Path) -> None:
    (tmp_path / "config.json").write_text(
        '{"architectures": ["RWForCausalLM"], "model_type": "RefinedWeb", '
        '"auto_map": {"AutoModelForCausalLM": "modelling_RW.RWForCausalLM"}}')
    with pytest.raises(UnsupportedModelError, match=r"RWForCausalLM.*supported: Llama"):
        load_model(str(tmp_path))
