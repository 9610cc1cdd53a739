"""``kv_cache_dtype``: an fp32 model keeping its keys and values in fp16 or bf16. The kernels
read the narrow cache as the torch path does, every attention reads keys and values as stored
(fresh ones included, so that chunking or a prefix-cache hit changes nothing), the cache takes
half the bytes a block, and settings the kernels cannot run are refused by name."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest
import torch

from pagedserve import LLM, EngineConfig, SamplingParams
from pagedserve.kernels import cpu
from pagedserve.kernels.attention import NULL_BLOCK, AttentionMetadata, paged_attention
from pagedserve.model.loader import LoadedModel
from pagedserve.model.runner import kv_block_bytes
from pagedserve.repository.engine_args import engine_config
from pagedserve.repository.errors import RepositoryError
from pagedserve.repository.model_config import load_config
from tests.conftest import TinyFactory, assert_all_blocks_free
from tests.prompts import random_prompts

NARROW = [torch.float16, torch.bfloat16]
needs_kernels = pytest.mark.skipif(not cpu.available(), reason="needs the C kernels")


def _paged(head_dim: int, kv_heads: int, cache_dtype: torch.dtype, lens: list[int],
           block_size: int = 16) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Random K/V caches of ``cache_dtype`` and block tables of scattered blocks for ``lens``."""
    torch.manual_seed(head_dim + len(lens))
    blocks = sum(-(-n // block_size) for n in lens) + 8
    k = torch.randn(blocks, block_size, kv_heads, head_dim).to(cache_dtype)
    v = torch.randn(blocks, block_size, kv_heads, head_dim).to(cache_dtype)
    free = (torch.randperm(blocks - 1) + 1).tolist()
    tables = []
    for n in lens:
        tables.append([free.pop() for _ in range(-(-n // block_size))])
    width = max(len(t) for t in tables)
    return k, v, torch.tensor([t + [NULL_BLOCK] * (width - len(t)) for t in tables])


@needs_kernels
@pytest.mark.parametrize("cache_dtype", NARROW)
@pytest.mark.parametrize(("head_dim", "kv_heads", "heads"),
                         [(64, 3, 9), (128, 2, 8), (64, 2, 2), (24, 1, 3), (20, 1, 3)])
@pytest.mark.parametrize("variant", ["plain", "window", "alibi"])
def test_decode_kernel_reads_a_narrow_cache_as_its_fp32_copy(
        cache_dtype: torch.dtype, head_dim: int, kv_heads: int, heads: int,
        variant: str) -> None:
    """fp32 queries over a 16-bit cache give the fp32 kernel's results over the cache widened,
    bit for bit (every head dimension: the vector path and the plain loops; group sizes 1 to 4;
    contexts that end inside a tile of keys)."""
    lens = [1, 3, 16, 17, 50, 129]
    k, v, tables = _paged(head_dim, kv_heads, cache_dtype, lens)
    q = torch.randn(len(lens), heads, head_dim)
    kw: dict[str, Any] = dict(
        sliding_window=20 if variant == "window" else None,
        alibi_slopes=torch.linspace(0.5, 0.01, heads) if variant == "alibi" else None)
    got = torch.full_like(q, float("nan"))
    cpu.decode_attention(q, k, v, tables, torch.tensor(lens), head_dim ** -0.5, got, **kw)
    expected = torch.empty_like(q)
    cpu.decode_attention(q, k.float(), v.float(), tables, torch.tensor(lens), head_dim ** -0.5,
                         expected, **kw)
    assert torch.equal(got, expected)


@needs_kernels
@pytest.mark.parametrize("cache_dtype", NARROW)
def test_rotary_write_stores_keys_and_values_rounded_to_the_cache(
        cache_dtype: torch.dtype) -> None:
    tokens, heads, kv_heads, head_dim = 5, 4, 2, 32
    qkv = torch.randn(tokens, (heads + 2 * kv_heads) * head_dim)
    angles = torch.rand(tokens, head_dim)
    cos, sin = angles.cos(), angles.sin()
    slots = torch.tensor([3, 17, 18, 40, 63])
    wide = [torch.zeros(4, 16, kv_heads, head_dim) for _ in range(2)]
    narrow = [torch.zeros(4, 16, kv_heads, head_dim, dtype=cache_dtype) for _ in range(2)]
    rotated_wide, rotated_narrow = qkv.clone(), qkv.clone()
    cpu.rotary_write_kv(rotated_wide, cos, sin, *wide, slots, heads, kv_heads)
    cpu.rotary_write_kv(rotated_narrow, cos, sin, *narrow, slots, heads, kv_heads)
    assert torch.equal(rotated_narrow, rotated_wide)  # q and k rotated in fp32 alike
    for w, n in zip(wide, narrow):
        assert torch.equal(n, w.to(cache_dtype))
    with pytest.raises(ValueError, match="one dtype among"):
        cpu.rotary_write_kv(qkv.to(torch.bfloat16), cos.bfloat16(), sin.bfloat16(),
                            *[torch.zeros(4, 16, kv_heads, head_dim, dtype=torch.float16)] * 2,
                            slots, heads, kv_heads)


def _step(cache_dtype: torch.dtype) -> tuple[torch.Tensor, ...]:
    """A step of two decodes, a chunk after cached context and a fresh prompt over a narrow
    cache; the new tokens' keys and values already written (as the layer does first)."""
    query_lens, seq_lens = [1, 1, 6, 9], [30, 7, 22, 9]
    kv_heads, heads, head_dim, bs = 2, 4, 32, 16
    k_cache, v_cache, tables = _paged(head_dim, kv_heads, cache_dtype, seq_lens, bs)
    slots = torch.cat([tables[i, torch.arange(n - q, n) // bs] * bs + torch.arange(n - q, n) % bs
                       for i, (q, n) in enumerate(zip(query_lens, seq_lens))])
    k = torch.randn(len(slots), kv_heads, head_dim)
    v = torch.randn(len(slots), kv_heads, head_dim)
    k_cache.view(-1, kv_heads, head_dim)[slots] = k.to(cache_dtype)
    v_cache.view(-1, kv_heads, head_dim)[slots] = v.to(cache_dtype)
    q = torch.randn(len(slots), heads, head_dim)
    return q, k, v, k_cache, v_cache, tables, torch.tensor(query_lens), torch.tensor(seq_lens)


def _meta(tables: torch.Tensor, query_lens: torch.Tensor, seq_lens: torch.Tensor
          ) -> AttentionMetadata:
    return AttentionMetadata(slot_mapping=torch.zeros(0, dtype=torch.long), block_tables=tables,
                             query_lens=query_lens.tolist(), seq_lens=seq_lens.tolist(),
                             num_decodes=2, block_size=16)


@pytest.mark.parametrize("cache_dtype", NARROW)
def test_every_attention_reads_keys_and_values_as_stored(
        cache_dtype: torch.dtype, monkeypatch: pytest.MonkeyPatch) -> None:
    """A step over a narrow cache (decodes, a chunk after its context, a fresh prompt) is the
    same step over the cache widened to fp32 with the fresh keys and values rounded as the cache
    holds them: the fresh prompt does not see more precise keys than later tokens will. The
    kernel path and the torch path agree."""
    q, k, v, k_cache, v_cache, tables, query_lens, seq_lens = _step(cache_dtype)
    got = paged_attention(q, k, v, k_cache, v_cache, _meta(tables, query_lens, seq_lens), 0.2)
    rounded_k, rounded_v = k.to(cache_dtype).float(), v.to(cache_dtype).float()
    expected = paged_attention(q, rounded_k, rounded_v, k_cache.float(), v_cache.float(),
                               _meta(tables, query_lens, seq_lens), 0.2)
    torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-5)
    monkeypatch.setattr(cpu, "available", lambda: False)
    on_torch = paged_attention(q, k, v, k_cache, v_cache, _meta(tables, query_lens, seq_lens),
                               0.2)
    torch.testing.assert_close(on_torch, expected, rtol=1e-5, atol=1e-5)


def test_settings_check_the_cache_dtype(tmp_path: Path) -> None:
    assert EngineConfig().kv_cache_torch_dtype == EngineConfig().torch_dtype
    config = EngineConfig(dtype="float32", kv_cache_dtype="float16")
    assert (config.torch_dtype, config.kv_cache_torch_dtype) == (torch.float32, torch.float16)
    assert EngineConfig(dtype="bfloat16", kv_cache_dtype="bfloat16").kv_cache_torch_dtype == \
        torch.bfloat16
    with pytest.raises(ValueError, match="kv_cache_dtype must be 'auto' or one of "
                                         r"\['bfloat16', 'float16', 'float32'\], got 'fp8'"):
        EngineConfig(kv_cache_dtype="fp8")
    with pytest.raises(ValueError, match="kv_cache_dtype='float16' needs a float32 model"):
        EngineConfig(dtype="bfloat16", kv_cache_dtype="float16")
    with pytest.raises(ValueError, match="kv_cache_dtype='float32' needs a float32 model"):
        EngineConfig(dtype="float16", kv_cache_dtype="float32")
    folder = tmp_path / "m"
    (folder / "1").mkdir(parents=True)
    (folder / "config.pbtxt").write_text('backend: "vllm"')
    (folder / "1" / "model.json").write_text(json.dumps({"kv_cache_dtype": "float16",
                                                         "dtype": "float32"}))
    assert engine_config(load_config(folder), folder / "1").kv_cache_dtype == "float16"
    (folder / "1" / "model.json").write_text(json.dumps({"kv_cache_dtype": "fp8_e4m3"}))
    with pytest.raises(RepositoryError, match="kv_cache_dtype must be"):
        engine_config(load_config(folder), folder / "1")


def _greedy(llm: LLM, prompts: list[list[int]]) -> list[list[int]]:
    params = SamplingParams(temperature=0.0, max_tokens=10, ignore_eos=True)
    outputs = llm.generate(prompt_token_ids=prompts, sampling_params=params, use_tqdm=False)
    return [list(o.outputs[0].token_ids) for o in outputs]


def test_a_narrow_cache_holds_twice_the_blocks_and_splitting_changes_nothing(
        tiny_llama: TinyFactory) -> None:
    """The same bytes hold twice the blocks in fp16; greedy outputs over it are the same
    whether prompts are prefilled whole, in chunks of 8 tokens, or after a prefix-cache hit;
    every block comes back."""
    path = str(tiny_llama(num_heads=4, num_kv_heads=2, head_dim=32))
    settings: dict[str, Any] = dict(model=path, dtype="float32", kv_cache_bytes=2**21)
    wide = LLM(**settings)
    whole = LLM(**settings, kv_cache_dtype="float16", enable_prefix_caching=False)
    model = whole.engine.model
    assert kv_block_bytes(model, 16, torch.float16) * 2 == kv_block_bytes(model, 16)
    assert whole.engine.block_manager.num_usable_blocks == \
        2 * wide.engine.block_manager.num_usable_blocks + 1  # the null block counted once
    prompts = random_prompts(seed=5, count=4, longest=40)
    expected = _greedy(whole, prompts)
    chunked = LLM(**settings, kv_cache_dtype="float16", max_num_batched_tokens=8,
                  enable_prefix_caching=False)
    assert _greedy(chunked, prompts) == expected
    cached = LLM(**settings, kv_cache_dtype="float16", enable_prefix_caching=True)
    assert _greedy(cached, prompts) == expected
    # The second time, each prompt's full blocks come from the cache.
    assert _greedy(cached, prompts) == expected
    for llm in (whole, chunked, cached):
        assert_all_blocks_free(llm)


@needs_kernels
def test_the_embedded_file_over_an_fp16_cache_scores_as_over_fp32(smollm: LoadedModel) -> None:
    """SmolLM2's file (``quantization="gguf"``) over an fp16 cache, on the fused decode path:
    the log-probabilities of a greedy continuation stay within rounding of the fp32 cache's
    (measured differences in docs/benchmarks.md), and the first greedy tokens are the same."""
    prompt = smollm.tokenizer.encode("The three primary colors are")
    params = SamplingParams(temperature=0.0, max_tokens=8, ignore_eos=True, logprobs=0)
    runs = {}
    for kv in ("auto", "float16"):
        llm = LLM(quantization="gguf", dtype="float32", kv_cache_dtype=kv,
                  kv_cache_bytes=2**24)
        assert llm.engine.model.fused_decode is not None  # type: ignore[attr-defined]
        completion = llm.generate(prompt_token_ids=[prompt], sampling_params=params,
                                  use_tqdm=False)[0].outputs[0]
        assert completion.logprobs is not None
        runs[kv] = (list(completion.token_ids),
                    [step[t] for step, t in zip(completion.logprobs, completion.token_ids)])
    assert runs["float16"][0][:4] == runs["auto"][0][:4]
    for wide, narrow in zip(runs["auto"][1][:4], runs["float16"][1][:4]):
        assert abs(wide - narrow) < 0.1
