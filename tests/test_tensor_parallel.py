"""Tensor parallelism end to end: N ranks in worker processes (gloo on this CPU) against one
rank in process and against ``transformers``, token for token.

Each case is a tiny random Llama with grouped-query attention whose heads split over its N (head
sizes 64 and 128). One engine per case serves every check (spawning ranks costs seconds): greedy
decoding with chunked prefill (16-token steps), prefix caching (a second batch sharing the
first's prefixes) and preemption (a cache that holds the longest sequence but not the batch),
then beam search; last, shutdown joins every rank. Apart: a shape that does not divide is refused
before anything is spawned, a killed rank fails the engine at once (never a hang), and two
"nodes" on loopback serve one model through the ``torch.distributed`` rendezvous.
"""

from __future__ import annotations

import asyncio
import multiprocessing
import os
import random
import shutil
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import psutil
import pytest
import torch
from transformers import AutoModelForCausalLM

from pagedserve import LLM, EngineConfig, SamplingParams
from pagedserve.engine.async_engine import AsyncEngine, EngineDead
from pagedserve.engine.core import EngineCore
from pagedserve.model.batch import ModelInput, SeqChunk
from pagedserve.model.executor import ExecutorDied
from pagedserve.model.file_checks import ModelFileError
from pagedserve.model.loader import LoadedModel, load_model
from pagedserve.model.multiproc import MultiprocExecutor
from tests.conftest import TinyFactory, assert_all_blocks_free, hf_greedy
from tests.prompts import TINY_VOCAB
from tests.server.conftest import ROOT, free_port

MAX_NEW = 12
BLOCK = 4
# (shape of the tiny model, ranks): the heads and KV heads divide by the ranks.
CASES = {"gqa-head64-tp3": ({"num_heads": 6, "num_kv_heads": 3, "head_dim": 64}, 3),
         "gqa-head128-tp2": ({"num_heads": 4, "num_kv_heads": 2, "head_dim": 128}, 2)}


def _prompts(seed: int, lengths: list[int]) -> list[list[int]]:
    rng = random.Random(seed)
    return [[rng.randrange(100, TINY_VOCAB) for _ in range(n)] for n in lengths]


FIRST = _prompts(1, [40, 5, 17, 33, 9, 24])
# The same first 32 tokens as FIRST's first prompt (8 full blocks), other endings.
SHARED = [FIRST[0][:32] + tail for tail in _prompts(2, [3, 11])]


@dataclass
class Case:
    path: Path
    ranks: int
    tp: LLM
    single: LLM
    hf: torch.nn.Module


def _settings(shape: dict[str, int], ranks: int) -> dict[str, Any]:
    # 20 blocks: the longest sequence (52 tokens, 13 blocks) fits, the batch does not.
    block_bytes = 2 * 2 * shape["num_kv_heads"] * shape["head_dim"] * 4 * BLOCK
    return {"dtype": "float32", "block_size": BLOCK, "kv_cache_bytes": 20 * block_bytes,
            "max_num_batched_tokens": 16, "tensor_parallel_size": ranks}


@pytest.fixture(scope="module", params=list(CASES))
def case(request: pytest.FixtureRequest, tiny_llama: TinyFactory) -> Iterator[Case]:
    shape, ranks = CASES[request.param]
    path = tiny_llama(**shape, intermediate=384)
    tp = LLM(str(path), **_settings(shape, ranks))
    try:
        single = LLM(str(path), **_settings(shape, 1))
        hf = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).eval()
        yield Case(path, ranks, tp, single, hf)
    finally:
        tp.shutdown()


def _greedy(llm: LLM, prompts: list[list[int]]) -> list[list[int]]:
    outputs = llm.generate(prompt_token_ids=prompts, use_tqdm=False,
                           sampling_params=SamplingParams(temperature=0, max_tokens=MAX_NEW))
    return [list(o.outputs[0].token_ids) for o in outputs]


def test_greedy_matches_one_rank_and_transformers(case: Case) -> None:
    assert len(case.tp.engine.executor.worker_pids) == case.ranks
    got = _greedy(case.tp, FIRST)
    assert got == _greedy(case.single, FIRST)
    assert got == [hf_greedy(case.hf, p, MAX_NEW) for p in FIRST]
    stats = case.tp.stats()
    assert stats.num_preemptions > 0
    assert stats.num_blocks_total == case.single.stats().num_blocks_total
    assert stats.tensor_parallel_comm_ns > 0
    hits = stats.prefix_cache_hit_tokens
    got = _greedy(case.tp, SHARED)
    assert case.tp.stats().prefix_cache_hit_tokens > hits
    assert got == _greedy(case.single, SHARED)
    assert got == [hf_greedy(case.hf, p, MAX_NEW) for p in SHARED]
    assert_all_blocks_free(case.tp)


def test_beam_search_matches_one_rank(case: Case) -> None:
    params = SamplingParams(beam_width=3, n=2, max_tokens=6)
    prompts = FIRST[1:3]
    got = case.tp.generate(prompt_token_ids=prompts, sampling_params=params, use_tqdm=False)
    want = case.single.generate(prompt_token_ids=prompts, sampling_params=params,
                                use_tqdm=False)
    for g, w in zip(got, want):
        assert [c.token_ids for c in g.outputs] == [c.token_ids for c in w.outputs]
        assert [c.cumulative_logprob for c in g.outputs] == pytest.approx(
            [c.cumulative_logprob for c in w.outputs], abs=1e-3)
    assert_all_blocks_free(case.tp)


def test_shutdown_joins_every_rank(case: Case) -> None:
    pids = case.tp.engine.executor.worker_pids
    case.tp.shutdown()
    assert not multiprocessing.active_children()
    assert not [pid for pid in pids if psutil.pid_exists(pid)]
    case.tp.shutdown()  # idempotent


def test_a_shape_that_does_not_divide_is_refused_before_spawning(smollm: LoadedModel) -> None:
    with pytest.raises(ValueError, match=r"tensor_parallel_size=2 does not divide the model: "
                                         r"9 query heads .* 3 KV heads"):
        LLM(smollm.path, tensor_parallel_size=2)
    assert not multiprocessing.active_children()


@pytest.mark.parametrize(("value", "message"), [
    (0, "tensor_parallel_size must be at least 1, got 0"),
    ("2", "tensor_parallel_size must be an integer, got '2'"),
    (True, "tensor_parallel_size must be an integer, got True"),
    (4096, "tensor_parallel_size must be at most 1024, got 4096"),
])
def test_tensor_parallel_size_is_checked(value: Any, message: str) -> None:
    with pytest.raises(ValueError, match=message):
        EngineConfig(tensor_parallel_size=value)


def test_nnodes_must_divide_the_ranks() -> None:
    with pytest.raises(ValueError, match="tensor_parallel_size=3 must be a multiple of nnodes=2"):
        EngineConfig(tensor_parallel_size=3, nnodes=2)


def _two_rank_engine(tiny_llama: TinyFactory) -> tuple[AsyncEngine, list[int]]:
    """An async engine over 2 ranks of a tiny model, with its ranks' pids."""
    loaded = load_model(str(tiny_llama(**CASES["gqa-head128-tp2"][0], intermediate=384)))
    engine = AsyncEngine(EngineCore(EngineConfig(dtype="float32", kv_cache_bytes=2**22,
                                                 tensor_parallel_size=2), loaded))
    executor = engine.core.executor
    assert isinstance(executor, MultiprocExecutor)
    return engine, executor.worker_pids


@pytest.mark.slow
def test_a_killed_rank_fails_the_engine_at_once(tiny_llama: TinyFactory) -> None:
    """SIGKILL to rank 1 mid-request: the request fails naming the rank, pid and signal, the
    engine refuses new requests with that error, and no rank is left running (the weights
    reach the ranks from the caller's memory, not from a path)."""
    engine, pids = _two_rank_engine(tiny_llama)
    error = rf"rank 1 \(pid {pids[1]}\) was killed by signal 9 \(SIGKILL\)"

    async def scenario() -> None:
        stream = engine.generate(None, SamplingParams(max_tokens=1000, ignore_eos=True), "r1",
                                 prompt_token_ids=FIRST[0])
        await anext(stream)
        assert engine.failure() is None
        os.kill(pids[1], signal.SIGKILL)
        with pytest.raises(EngineDead, match=error):
            async for _ in stream:
                pass
        with pytest.raises(EngineDead, match=error):
            await anext(engine.generate(None, SamplingParams(max_tokens=2), "r2",
                                        prompt_token_ids=[1, 2]))

    try:
        asyncio.run(asyncio.wait_for(scenario(), timeout=120))
        assert engine.failure() is not None and "SIGKILL" in str(engine.failure())
        assert not [pid for pid in pids if psutil.pid_exists(pid)]
    finally:
        engine.shutdown()
    assert not multiprocessing.active_children()


@pytest.mark.slow
def test_a_rank_killed_while_idle_stops_the_others(tiny_llama: TinyFactory) -> None:
    """No request running: the idle engine still sees the death, stops the other rank and
    reports itself dead, within a bounded wait."""
    engine, pids = _two_rank_engine(tiny_llama)
    try:
        os.kill(pids[1], signal.SIGKILL)
        deadline = time.monotonic() + 60
        while (engine.failure() is None or "during an idle wait" not in engine.failure()
               or not all(_gone(pid) for pid in pids)):
            assert time.monotonic() < deadline, (engine.failure(), pids)
            time.sleep(0.05)
        assert f"rank 1 (pid {pids[1]}) was killed by signal 9 (SIGKILL)" in engine.failure()
    finally:
        engine.shutdown()
    assert not multiprocessing.active_children()


@pytest.mark.slow
def test_a_failed_step_ends_the_ranks_at_once(tiny_llama: TinyFactory) -> None:
    """A step that raises on the ranks (a block table past the cache) ends them, rather than
    leaving them out of step in their collectives: the executor dies naming the rank and its
    error, within a bounded wait, and later steps fail the same way."""
    loaded = load_model(str(tiny_llama(**CASES["gqa-head128-tp2"][0], intermediate=384)))
    executor = MultiprocExecutor(EngineConfig(dtype="float32", kv_cache_bytes=2**20,
                                              tensor_parallel_size=2), loaded.config, loaded)
    past = executor.facts.num_kv_blocks + 10
    step = ModelInput([SeqChunk(0, [5, 6, 7], 0, [past], num_logits=1)])
    error = r"tensor-parallel worker rank \d \(pid \d+\) exited with code 1 during a step: "
    try:
        with pytest.raises(ExecutorDied, match=error + r"\w+Error"):
            executor.execute(step)
        with pytest.raises(ExecutorDied, match=error):
            executor.execute(ModelInput())
    finally:
        executor.shutdown()
    assert not multiprocessing.active_children()


@pytest.mark.slow
def test_a_rank_that_fails_to_load_fails_the_start(tiny_llama: TinyFactory,
                                                   tmp_path: Path) -> None:
    """The driver reads only the config, the tokenizer and the weights' headers; the ranks
    read the weights, here without the final norm (renamed in the header, which the driver's
    checks take): the start fails at once with a rank's own error, nothing left running."""
    source = tiny_llama(**CASES["gqa-head128-tp2"][0], intermediate=384)
    broken = tmp_path / "broken"
    shutil.copytree(source, broken)
    weights = broken / "model.safetensors"
    data = weights.read_bytes()
    assert data.count(b'"model.norm.weight"') == 1
    weights.write_bytes(data.replace(b'"model.norm.weight"', b'"model.norx.weight"'))
    with pytest.raises(ExecutorDied, match=r"tensor-parallel worker rank \d \(pid \d+\) exited "
                                           r"with code 1 during start-up: \w+Error"):
        LLM(str(broken), tensor_parallel_size=2)
    assert not multiprocessing.active_children()


def test_weights_cut_short_are_refused_before_any_rank_starts(tiny_llama: TinyFactory,
                                                              tmp_path: Path) -> None:
    source = tiny_llama(**CASES["gqa-head128-tp2"][0], intermediate=384)
    broken = tmp_path / "broken"
    shutil.copytree(source, broken)
    weights = broken / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[:4096])
    with pytest.raises(ModelFileError, match=r"outside the \d+ bytes of data"):
        LLM(str(broken), tensor_parallel_size=2)
    assert not multiprocessing.active_children()


DRIVER = """
import sys
from pagedserve import LLM
llm = LLM(sys.argv[1], tensor_parallel_size=2, kv_cache_bytes=2**22)
print(*llm.engine.executor.worker_pids, flush=True)
sys.stdin.read()
"""


def _gone(pid: int) -> bool:
    try:
        return psutil.Process(pid).status() == psutil.STATUS_ZOMBIE  # exited, not yet reaped
    except psutil.NoSuchProcess:
        return True


@pytest.mark.slow
def test_ranks_exit_when_the_driver_is_killed(tiny_llama: TinyFactory) -> None:
    path = tiny_llama(**CASES["gqa-head128-tp2"][0], intermediate=384)
    driver = subprocess.Popen([sys.executable, "-c", DRIVER, str(path)], cwd=ROOT,
                              stdin=subprocess.PIPE, stdout=subprocess.PIPE)
    try:
        assert driver.stdout is not None
        pids = [int(pid) for pid in driver.stdout.readline().split()]
        assert len(pids) == 2 and not any(_gone(pid) for pid in pids)
        driver.kill()
        driver.wait()
        deadline = time.monotonic() + 30
        while not all(_gone(pid) for pid in pids):
            assert time.monotonic() < deadline, "ranks outlived their driver"
            time.sleep(0.1)
    finally:
        if driver.poll() is None:
            driver.kill()
            driver.wait()


@pytest.mark.slow
def test_two_nodes_on_loopback(tiny_llama: TinyFactory, monkeypatch: pytest.MonkeyPatch,
                               tmp_path: Path) -> None:
    """Node 1 is ``python -m pagedserve worker`` in another process, joining node 0's engine
    through ``MASTER_ADDR`` / ``MASTER_PORT``, as on another machine."""
    shape, ranks = CASES["gqa-head128-tp2"]
    path = tiny_llama(**shape, intermediate=384)
    port = str(free_port())
    monkeypatch.setenv("MASTER_ADDR", "127.0.0.1")
    monkeypatch.setenv("MASTER_PORT", port)
    log = tmp_path / "node1.log"
    with open(log, "wb") as out:
        node = subprocess.Popen(
            [sys.executable, "-m", "pagedserve", "worker", "--tensor-parallel-size", str(ranks),
             "--nnodes", "2", "--node-rank", "1"], cwd=ROOT, stdout=out,
            stderr=subprocess.STDOUT,
            env={**os.environ, "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": port})
    try:
        llm = LLM(str(path), dtype="float32", kv_cache_bytes=2**22, tensor_parallel_size=ranks,
                  nnodes=2)
        try:
            assert len(llm.engine.executor.worker_pids) == 1  # this node's share
            hf = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).eval()
            assert _greedy(llm, FIRST[:3]) == [hf_greedy(hf, p, MAX_NEW) for p in FIRST[:3]]
        finally:
            llm.shutdown()
        assert node.wait(timeout=60) == 0, log.read_text()
    finally:
        if node.poll() is None:
            node.kill()
            node.wait()
