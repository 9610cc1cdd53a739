"""The engine's Triton path (interpreted without a GPU) gives the torch path's greedy tokens,
with chunked prefill, prefix-cache hits and beam search in the batch."""

from __future__ import annotations

import random
import threading
from types import SimpleNamespace
from typing import Any

import pytest
import torch

from pagedserve import LLM, SamplingParams
from pagedserve.config import EngineConfig
from pagedserve.engine.async_engine import AsyncEngine
from pagedserve.engine.core import EngineCore
from pagedserve.kernels import dispatch
from pagedserve.model.loader import load_model
from pagedserve.model.runner import num_kv_blocks
from tests.conftest import TinyFactory, assert_all_blocks_free
from tests.prompts import TINY_VOCAB

MAX_NEW = 4


def _generate(llm: LLM, prompts: list[list[int]]) -> list[list[list[int]]]:
    greedy = SamplingParams(temperature=0.0, max_tokens=MAX_NEW)
    beams = SamplingParams(beam_width=3, n=2, max_tokens=MAX_NEW)
    params = [beams if i == 1 else greedy for i in range(len(prompts))]
    outputs = llm.generate(prompt_token_ids=prompts, sampling_params=params, use_tqdm=False)
    return [[c.token_ids for c in o.outputs] for o in outputs]


def test_triton_path_matches_torch_path(tiny_llama: TinyFactory,
                                        monkeypatch: pytest.MonkeyPatch) -> None:
    path = tiny_llama(num_heads=4, num_kv_heads=1, head_dim=16, intermediate=128)
    gen = random.Random(11)
    shared = [gen.randrange(3, TINY_VOCAB) for _ in range(20)]  # more than a block: cached
    prompts = [shared + [gen.randrange(3, TINY_VOCAB) for _ in range(n)] for n in (3, 6, 0)]
    prompts.append([gen.randrange(3, TINY_VOCAB) for _ in range(13)])
    kernels = dispatch.triton_module("triton_attention", torch.device("cpu"))
    launches = []

    def counted(*args: Any, **kwargs: Any) -> None:
        launches.append(args[0].shape[0])
        kernel(*args, **kwargs)

    kernel = kernels.paged_attention
    monkeypatch.setattr(kernels, "paged_attention", counted)
    results = {}
    for backend in ("torch", "triton"):
        # A 16-token budget splits the prompts into chunks; the prompts after the first find
        # the shared block cached.
        llm = LLM(str(path), attention_backend=backend, block_size=16,
                  max_num_batched_tokens=16, kv_cache_bytes=2**20)
        results[backend] = _generate(llm, prompts)
        assert llm.stats().prefix_cache_hit_tokens >= 16 * 2
        assert_all_blocks_free(llm)
        # Every layer of every step went through the Triton kernel, none on the torch path.
        assert len(launches) == (llm.stats().num_steps * 2 if backend == "triton" else 0)
    assert results["triton"] == results["torch"]


def test_core_thread_makes_the_models_gpu_current(tiny_llama: TinyFactory,
                                                  monkeypatch: pytest.MonkeyPatch) -> None:
    """Threads start on CUDA device 0: the engine's core thread switches to the model's GPU
    before its first step (``cuda:1`` here, faked: no GPU is needed)."""
    core = EngineCore(EngineConfig(model=str(tiny_llama(num_heads=4, num_kv_heads=1,
                                                        head_dim=16, intermediate=128)),
                                   kv_cache_bytes=2**20))
    core.make_device_current()  # the model is on the CPU: nothing to switch
    calls: list[tuple[str, torch.device]] = []
    monkeypatch.setattr(torch.cuda, "set_device",
                        lambda d: calls.append((threading.current_thread().name, d)))
    monkeypatch.setattr(core.model, "lm_head",
                        SimpleNamespace(device=torch.device("cuda", 1), shape=(1,)))
    engine = AsyncEngine(core)
    engine.shutdown()
    assert calls == [("engine-core", torch.device("cuda", 1))]


def test_engine_drops_the_weights_it_loaded_before_sizing_the_cache(
        tiny_llama: TinyFactory, monkeypatch: pytest.MonkeyPatch) -> None:
    """The model fuses q, k and v into new tensors: the loader's copies must be freed before
    the KV cache takes the memory left, where the engine loaded them itself; weights passed
    in stay the caller's, to build more engines from."""
    path = str(tiny_llama(num_heads=4, num_kv_heads=1, head_dim=16, intermediate=128))
    config = EngineConfig(model=path, kv_cache_bytes=2**20)
    loaded = load_model(path, config.device, config.torch_dtype)
    held_at_sizing: list[int] = []

    def sizing(*args: Any) -> int:
        held_at_sizing.append(len(loaded.weights))
        return num_kv_blocks(*args)

    monkeypatch.setattr("pagedserve.model.executor.load_model", lambda *args, **kwargs: loaded)
    monkeypatch.setattr("pagedserve.model.executor.num_kv_blocks", sizing)
    count = len(loaded.weights)
    EngineCore(config, loaded=loaded)
    assert len(loaded.weights) == count
    core = EngineCore(config)
    assert held_at_sizing == [count, 0] and not loaded.weights
    core.add_request(core.make_request("r", None, SamplingParams(max_tokens=2),
                                       prompt_token_ids=[5, 6, 7]))
    while core.has_unfinished_requests:
        core.step()
