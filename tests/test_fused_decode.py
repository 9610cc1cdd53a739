"""The fused decode layers (backend/model/fused_decode.py): a decode step of a block-quantized
Llama model runs its layers in one C call, with the results of the per-operation path bit for
bit, across the Llama family's additions (q/k/v biases, per-head q/k norms, sliding windows,
grouped heads) and both block formats."""

from __future__ import annotations

from collections.abc import Callable, Iterator
from dataclasses import replace
from pathlib import Path
from typing import Any

import pytest
import torch
from transformers import AutoModelForCausalLM, LlamaConfig, MistralConfig, Qwen2Config, Qwen3Config

from pagedserve import LLM, SamplingParams
from pagedserve.kernels import block_quant, cpu
from pagedserve.model import projections
from pagedserve.model.fused_decode import FusedDecode
from pagedserve.model.loader import LoadedModel, load_model
from pagedserve.model.projections import GGUF, as_blocks
from tests.conftest import assert_all_blocks_free
from tests.prompts import TINY_VOCAB, random_prompts

pytestmark = pytest.mark.skipif(not cpu.available(), reason="needs the C kernels (a compiler)")

WINDOW = 24
FAMILIES: dict[str, tuple[Any, dict[str, Any]]] = {
    "llama-gqa": (LlamaConfig, dict(num_attention_heads=4, num_key_value_heads=2, head_dim=16)),
    "mistral-window": (MistralConfig, dict(num_attention_heads=4, num_key_value_heads=2,
                                           head_dim=16, sliding_window=WINDOW)),
    "qwen2-biases": (Qwen2Config, dict(num_attention_heads=2, num_key_value_heads=1)),
    "qwen3-head-norms": (Qwen3Config, dict(num_attention_heads=4, num_key_value_heads=2,
                                           head_dim=32)),
}
# Wide enough that a decode step's layers run in a team of threads: the C layers give each
# thread at least 2^20 multiply-adds a layer, and a layer here is 2.4 million a row.
WIDE = (LlamaConfig, dict(num_attention_heads=8, num_key_value_heads=4, head_dim=64,
                          hidden_size=512, intermediate_size=1024))
# The same with a query head per KV head of 48, not a multiple of a Q8 block (32): the team
# splits the attention by whole rows.
WIDE_48 = (LlamaConfig, dict(num_attention_heads=8, num_key_value_heads=8, head_dim=48,
                             hidden_size=512, intermediate_size=1024))
WIDE_MODELS = {"llama-wide": WIDE, "llama-wide-48": WIDE_48}


def _kinds(name: str) -> str:
    # Both formats in every model: the attention output and MLP down rows as Q8_0.
    return "q8_0" if name.endswith(("o_proj.weight", "down_proj.weight")) else "q4_1"


@pytest.fixture(scope="module")
def tiny_blocks(tmp_path_factory: pytest.TempPathFactory,
                smollm: LoadedModel) -> Iterator[Callable[[str], LoadedModel]]:
    """A random-weight model of each family (hidden 64, 2 layers, random biases and norms)
    with SmolLM2's tokenizer, its projections in blocks as ``quantization="gguf"`` reads
    them."""
    made: dict[str, LoadedModel] = {}
    tok = smollm.tokenizer

    def make(name: str) -> LoadedModel:
        if name not in made:
            config_class, shape = WIDE_MODELS.get(name) or FAMILIES[name]
            torch.manual_seed(0)
            config = config_class(**{
                "vocab_size": TINY_VOCAB, "hidden_size": 64, "intermediate_size": 128,
                "num_hidden_layers": 2, "max_position_embeddings": 512,
                "initializer_range": 0.15, "bos_token_id": tok.bos_token_id,
                "eos_token_id": tok.eos_token_id, "pad_token_id": tok.eos_token_id, **shape})
            path = tmp_path_factory.mktemp(name)
            model = AutoModelForCausalLM.from_config(config)
            with torch.no_grad():  # biases start at zero, norms at one: made to matter
                for tensor in model.parameters():
                    if tensor.dim() == 1:
                        tensor.add_(torch.randn_like(tensor) * 0.3)
            model.save_pretrained(path)
            tok.save_pretrained(path)
            loaded = load_model(str(path))
            made[name] = replace(loaded, weights=as_blocks(loaded.weights, _kinds),
                                 quantization=GGUF)
        return made[name]

    yield make



def _run(llm: LLM, prompts: list[list[int]]) -> list[tuple[list[int], list[float]]]:
    params = SamplingParams(temperature=0.0, max_tokens=12, ignore_eos=True, logprobs=0)
    outputs = llm.generate(prompt_token_ids=prompts, sampling_params=params, use_tqdm=False)
    result = []
    for output in outputs:
        completion = output.outputs[0]
        assert completion.logprobs is not None
        chosen = [step[token] for step, token in zip(completion.logprobs,
                                                      completion.token_ids)]
        result.append((list(completion.token_ids), chosen))
    return result


def _assert_bit_for_bit(loaded: LoadedModel, seed: int, monkeypatch: pytest.MonkeyPatch,
                        kv_cache_dtype: str = "auto", count: int = 5) -> None:
    settings = dict(loaded=loaded, quantization="gguf", dtype="float32", kv_cache_bytes=2**22,
                    enable_prefix_caching=False, kv_cache_dtype=kv_cache_dtype)
    calls = {"fused": 0}
    fused_layers = cpu.decode_layers

    def counted(*args: Any, **kwargs: Any) -> torch.Tensor:
        calls["fused"] += 1
        return fused_layers(*args, **kwargs)

    monkeypatch.setattr(cpu, "decode_layers", counted)
    prompts = random_prompts(seed=seed, count=count, longest=40)
    fused = LLM(**settings)
    assert fused.engine.model.fused_decode is not None  # type: ignore[attr-defined]
    with_fusion = _run(fused, prompts)
    # Every sequence decodes 11 tokens after its prefill; steps with a prefill in them run
    # the layers one by one, so at least 11 steps were fused.
    assert calls["fused"] >= 11
    assert_all_blocks_free(fused)
    plain = LLM(**settings)
    plain.engine.model.fused_decode = None  # type: ignore[attr-defined]
    calls["fused"] = 0
    assert _run(plain, prompts) == with_fusion
    assert calls["fused"] == 0


@pytest.mark.parametrize("family", list(FAMILIES))
def test_fused_decode_is_the_per_operation_path_bit_for_bit(
        family: str, tiny_blocks: Callable[[str], LoadedModel],
        monkeypatch: pytest.MonkeyPatch) -> None:
    """Greedy tokens and their log-probabilities (the logits, exactly) are the same with the
    fused decode layers and without, for a batch of prompts of mixed lengths (longer than the
    sliding window), and the fused path ran every decode step."""
    _assert_bit_for_bit(tiny_blocks(family), len(family), monkeypatch)


@pytest.mark.parametrize("kv_cache_dtype", ["float16", "bfloat16"])
@pytest.mark.parametrize("family", ["llama-gqa", "mistral-window"])
def test_fused_decode_over_a_narrow_cache_is_the_per_operation_path(
        family: str, kv_cache_dtype: str, tiny_blocks: Callable[[str], LoadedModel],
        monkeypatch: pytest.MonkeyPatch) -> None:
    """The same over a 16-bit KV cache (``kv_cache_dtype``): both paths round keys and values
    to it alike and read them as stored."""
    _assert_bit_for_bit(tiny_blocks(family), len(family), monkeypatch, kv_cache_dtype)


def test_fused_decode_takes_q4_1_rows_as_stored(tiny_blocks: Callable[[str], LoadedModel],
                                                 monkeypatch: pytest.MonkeyPatch) -> None:
    """Q4_1 rows that are not repacked (a row count not a multiple of eight) run fused too."""
    monkeypatch.setattr(projections, "pack_rows", lambda weight: weight)
    loaded = tiny_blocks("llama-gqa")
    llm = LLM(loaded=loaded, quantization="gguf", dtype="float32", kv_cache_bytes=2**22)
    assert llm.engine.model.layers[0].qkv.kind == "q4_1"  # type: ignore[attr-defined]
    _assert_bit_for_bit(loaded, 3, monkeypatch)


@pytest.mark.parametrize("threads", [2, 3])
@pytest.mark.parametrize("packed", [True, False])
def test_fused_decode_in_a_team_of_threads_is_the_per_operation_path(
        threads: int, packed: bool, tiny_blocks: Callable[[str], LoadedModel],
        monkeypatch: pytest.MonkeyPatch) -> None:
    """A step's layers in a team of threads (a model wide enough for one), which splits each
    product's columns, the attention's KV heads and every other stage's rows, give the
    per-operation path's results bit for bit, over weight rows repacked or as stored, with more
    threads than the machine may have cores (the team's barrier then yields its core)."""
    if not packed:
        monkeypatch.setattr(projections, "pack_rows", lambda weight: weight)
    previous = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        _assert_bit_for_bit(tiny_blocks("llama-wide"), threads, monkeypatch)
    finally:
        torch.set_num_threads(previous)


@pytest.mark.parametrize("threads", [2, 3])
@pytest.mark.parametrize("model, count", [("llama-wide", 1), ("llama-wide-48", 2)])
def test_fewer_sequences_than_threads_split_their_heads(
        threads: int, model: str, count: int, tiny_blocks: Callable[[str], LoadedModel],
        monkeypatch: pytest.MonkeyPatch) -> None:
    """With fewer sequences than the team has threads, the team splits the attention's KV
    heads, a sequence's among threads (heads of 64), or whole sequences (KV heads of 48, whose
    outputs do not end on a Q8 block), over a 16-bit cache: the per-operation path's results,
    bit for bit."""
    previous = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        _assert_bit_for_bit(tiny_blocks(model), threads, monkeypatch, "float16", count)
    finally:
        torch.set_num_threads(previous)


def test_fused_decode_applies_to_blocks_only(tiny_blocks: Callable[[str], LoadedModel],
                                             smollm: LoadedModel) -> None:
    """A model with any projection left plain (a GGUF tensor type without a kernel) or bf16
    activations runs its layers one by one; int4 and int8 weights, blocks made at load, take
    the fused path."""
    loaded = tiny_blocks("llama-gqa")
    settings = dict(dtype="float32", kv_cache_bytes=2**22)
    one_plain = dict(loaded.weights)
    down = "model.layers.1.mlp.down_proj.weight"
    one_plain.update(as_blocks({down: torch.randn(64, 128)}, lambda name: None))
    del one_plain[f"{down}:q8_0"]
    mixed = LLM(loaded=replace(loaded, weights=one_plain), quantization="gguf", **settings)
    assert mixed.engine.model.fused_decode is None  # type: ignore[attr-defined]
    assert LLM(loaded=loaded, quantization="gguf",
               **settings).engine.model.fused_decode is not None  # type: ignore[attr-defined]
    plain = load_model(str(Path(loaded.path)))
    for kind in ("int4", "int8"):
        built = LLM(loaded=plain, quantization=kind, **settings)
        assert built.engine.model.fused_decode is not None  # type: ignore[attr-defined]
    in_bf16 = LLM(loaded=loaded, quantization="gguf", dtype="bfloat16", kv_cache_bytes=2**22)
    assert in_bf16.engine.model.fused_decode is None  # type: ignore[attr-defined]
    # The C layers size their scratch from one shape: a layer of another shape is refused.
    layers = LLM(loaded=loaded, quantization="gguf",
                 **settings).engine.model.layers  # type: ignore[attr-defined]
    assert FusedDecode.of(layers, 64) is not None
    layers[1].down = block_quant.quantize(torch.randn(64, 96), "q8_0")
    assert FusedDecode.of(layers, 64) is None


@pytest.mark.parametrize("family, threads", [("llama-gqa", 1), ("llama-wide", 2)])
def test_a_slot_outside_the_cache_is_refused(family: str, threads: int,
                                             tiny_blocks: Callable[[str], LoadedModel]) -> None:
    """The C layers check the step's slots, lengths and block tables before writing: a slot
    outside the cache is a ValueError, not a write out of bounds, also when it is the second
    thread of a team (the wide model, two rows) whose rows fail while the first's succeed."""
    llm = LLM(loaded=tiny_blocks(family), quantization="gguf", dtype="float32",
              kv_cache_bytes=2**22)
    model = llm.engine.model
    fused = model.fused_decode  # type: ignore[attr-defined]
    caches = llm.engine.executor.runner.caches  # type: ignore[attr-defined]
    k_cache = caches[0][0]
    rows = threads
    h = torch.zeros(rows, fused.shape.hidden)
    cos = sin = torch.zeros(rows, fused.shape.head_dim)
    slots = torch.arange(rows)
    slots[-1] = k_cache.shape[0] * k_cache.shape[1]
    tables = torch.ones(rows, 1, dtype=torch.long)
    previous = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        with pytest.raises(ValueError, match="outside the cache"):
            cpu.decode_layers(fused._layer_structs(caches), fused.shape, h, cos, sin, slots,
                              k_cache.shape[0], k_cache.shape[1], tables,
                              torch.ones(rows, dtype=torch.long))
    finally:
        torch.set_num_threads(previous)
