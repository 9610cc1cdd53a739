"""The tensor-parallel model: 2 and 3 ranks over gloo on loopback, each building its shard of
the same weights and running the engine's own steps (``ModelRunner`` over a paged KV cache of
its share of the KV heads), give every rank the unsharded model's logits and greedy tokens; and
shapes that do not split are refused with their numbers."""

from __future__ import annotations

import multiprocessing.connection
import socket
import time
import traceback
from dataclasses import dataclass, field
from datetime import timedelta
from pathlib import Path
from typing import Any

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from safetensors.torch import load_file
from transformers import (
    AutoConfig,
    AutoModelForCausalLM,
    FalconConfig,
    LlamaConfig,
    Qwen2Config,
    Qwen3Config,
)

from pagedserve.model.batch import ModelInput, SeqChunk
from pagedserve.model.loader import LoadedModel
from pagedserve.model.parallel import (
    ParallelGroup,
    all_gather_last_dim,
    all_reduce,
    check_tensor_parallel,
)
from pagedserve.model.registry import build_model
from pagedserve.model.runner import ModelRunner

BLOCK = 4
NUM_BLOCKS = 64
SPAWN_DEADLINE_S = 300.0
TINY_VOCAB = 1001  # divides neither 2 nor 3: the vocabulary shards are padded


def _prompts(vocab: int) -> dict[str, list[int]]:
    gen = torch.Generator().manual_seed(vocab)
    a, b, c, d = (torch.randint(3, vocab, (n,), generator=gen).tolist() for n in (9, 22, 3, 5))
    return {"a": a, "b": b, "c": c, "d": a[:8] + d}  # d shares a's first two blocks


@dataclass
class _Seqs:
    """The script's sequences: their tokens so far and their block tables."""

    tokens: dict[str, list[int]]
    tables: dict[str, list[int]] = field(default_factory=dict)
    next_block: int = 1  # block 0 is the null block

    def blocks(self, count: int) -> list[int]:
        self.next_block += count
        return list(range(self.next_block - count, self.next_block))


def _run_script(runner: ModelRunner, vocab: int) -> tuple[list[torch.Tensor], list[list[int]]]:
    """Greedy steps as the scheduler makes them: a prefill beside a first prefill chunk; the
    chunk's rest beside a decode and a new prefill; a sequence that reuses another's cached
    prefix blocks and one forked from another by a block copy, beside decodes; then decodes of
    all. Returns each step's logits and greedy tokens."""
    s = _Seqs(_prompts(vocab))
    for name in "abcd":
        s.tables[name] = s.blocks(10)
    s.tables["d"] = s.tables["a"][:2] + s.tables["d"][2:]

    def chunk(name: str, start: int, end: int, num_logits: int = 1) -> SeqChunk:
        return SeqChunk(ord(name), s.tokens[name][start:end], start, s.tables[name], num_logits)

    def decode(name: str) -> SeqChunk:
        n = len(s.tokens[name])
        return chunk(name, n - 1, n)

    def step(number: int) -> tuple[str, ModelInput]:
        """The step's sampling sequences, in order, and the step."""
        if number == 0:
            return "a", ModelInput([chunk("a", 0, 9), chunk("b", 0, 12, num_logits=0)])
        if number == 1:
            return "abc", ModelInput([decode("a"), chunk("b", 12, 22), chunk("c", 0, 3)])
        if number == 2:  # e forks from c after its first pick: c's partial block is copied
            s.tokens["e"] = list(s.tokens["c"])
            s.tables["e"] = s.blocks(10)
            return "abced", ModelInput(
                [decode("a"), decode("b"), decode("c"), decode("e"),
                 chunk("d", 8, len(s.tokens["d"]))],
                block_copies=[(s.tables["c"][0], s.tables["e"][0])])
        return "abcde", ModelInput([decode(n) for n in "abcde"])

    logits: list[torch.Tensor] = []
    tokens: list[list[int]] = []
    for number in range(6):
        names, model_input = step(number)
        out = runner.execute(model_input)
        picks = out.logits.argmax(-1).tolist()
        for name, pick in zip(names, picks, strict=True):
            s.tokens[name].append(pick)
        logits.append(out.logits)
        tokens.append(picks)
    return logits, tokens


def _build(path: str, parallel: ParallelGroup | None) -> ModelRunner:
    config = AutoConfig.from_pretrained(path)
    model = build_model(config, load_file(str(Path(path) / "model.safetensors")), torch.float32,
                        "cpu", parallel)
    return ModelRunner(model, NUM_BLOCKS, BLOCK)


Models = dict[int, list[str]]  # world size: the models sharded over that many ranks


def _rank_main(rank: int, port: int, models: Models, out_dir: str) -> None:
    """One of ``max(models)`` ranks: for each world size, builds the shards of its models over
    the group of the first ranks, and runs the script on them; writes what it saw (or its
    traceback) to ``out_dir``. The smaller group is a subgroup of the default one, so a
    collective that strayed onto the default group would not add up."""
    torch.set_num_threads(1)
    try:
        dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank,
                                world_size=max(models), timeout=timedelta(seconds=120))
        # new_group is collective: every rank makes every group, members or not.
        groups = {world: dist.new_group(list(range(world))) for world in sorted(models)}
        results: dict[int, dict[str, Any]] = {}
        for world, paths in models.items():
            if rank >= world:
                continue
            pg = ParallelGroup(rank, world, groups[world])
            results[world] = {}
            for path in paths:
                runner = _build(path, pg)
                model = runner.model
                logits, tokens = _run_script(runner, model.vocab_size)
                results[world][path] = {"logits": logits, "tokens": tokens,
                                        "num_kv_heads": model.num_kv_heads,
                                        "cache_heads": runner.caches[0][0].shape[2],
                                        "lm_head_rows": model.lm_head.shape[0],
                                        "vocab_size": model.vocab_size,
                                        "layer": {name: tuple(weight.shape) for name, weight in (
                                            ("qkv", model.layers[0].qkv),
                                            ("o_proj", model.layers[0].o_proj),
                                            ("gate", model.layers[0].mlp_in[0]),
                                            ("down", model.layers[0].down))}}
            results[world]["stats"] = pg.stats
            half = ParallelGroup(rank, world, groups[world])  # gloo adds bf16 and fp16 itself
            results[world]["half"] = [
                all_reduce(torch.full((3,), rank + 1.5, dtype=dtype), half) for dtype in
                (torch.bfloat16, torch.float16)] + [
                all_gather_last_dim(torch.full((2, 2), rank, dtype=torch.bfloat16), half)]
        torch.save(results, Path(out_dir) / f"rank{rank}.pt")
        dist.destroy_process_group()
    except BaseException:
        (Path(out_dir) / f"rank{rank}.err").write_text(traceback.format_exc())
        raise


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def _spawn_ranks(models: Models, out_dir: Path) -> list[dict[int, dict[str, Any]]]:
    """Runs the ranks to the end (or the first failure, which stops the others) and returns
    what each saw; the processes are joined whatever happens."""
    ctx = mp.get_context("spawn")
    port = _free_port()
    procs = [ctx.Process(target=_rank_main, args=(r, port, models, str(out_dir)))
             for r in range(max(models))]
    try:
        for p in procs:
            p.start()
        deadline = time.monotonic() + SPAWN_DEADLINE_S
        running = list(procs)
        while running and time.monotonic() < deadline:
            multiprocessing.connection.wait([p.sentinel for p in running],
                                            timeout=deadline - time.monotonic())
            running = [p for p in running if p.exitcode is None]
            if any(p.exitcode for p in procs):
                break
    finally:
        for p in procs:
            if p.is_alive():
                p.kill()
            p.join()
    failed = [f"rank {r}: exit code {p.exitcode}\n" + (
              (out_dir / f"rank{r}.err").read_text() if (out_dir / f"rank{r}.err").exists()
              else "") for r, p in enumerate(procs) if p.exitcode != 0]
    assert not failed, "\n".join(failed)
    return [torch.load(out_dir / f"rank{r}.pt", weights_only=False) for r in range(len(procs))]


def _tiny_family(path: Path, config: Any) -> str:
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(config)
    with torch.no_grad():  # transformers starts biases at zero and norms at one
        for param in model.parameters():
            if param.dim() == 1:
                param.add_(torch.randn_like(param), alpha=0.2)
    model.save_pretrained(path)
    return str(path)


@pytest.fixture(scope="module")
def models(tiny_llama, tmp_path_factory: pytest.TempPathFactory) -> Models:
    """Per world size: a GQA Llama (head size 128 at 2 ranks: 3 heads and 1 KV head each; 64
    at 3: 2 and 1); a Llama with biases on every projection (the row-parallel ones added once)
    and tied embeddings (2 ranks); a Qwen2 (q/k/v biases, tied) and a Qwen3 (per-head q/k
    norms) at 3 ranks. The small ones have a vocabulary that is padded to split."""
    shape = dict(vocab_size=TINY_VOCAB, hidden_size=96, intermediate_size=192,
                 num_hidden_layers=2, num_attention_heads=6, max_position_embeddings=256,
                 initializer_range=0.15)
    biased = _tiny_family(tmp_path_factory.mktemp("llama-biased"), LlamaConfig(
        num_key_value_heads=2, attention_bias=True, mlp_bias=True, tie_word_embeddings=True,
        **shape))
    qwen2 = _tiny_family(tmp_path_factory.mktemp("qwen2"), Qwen2Config(
        num_key_value_heads=3, tie_word_embeddings=True, **shape))
    qwen3 = _tiny_family(tmp_path_factory.mktemp("qwen3"), Qwen3Config(
        num_key_value_heads=3, head_dim=32, **shape))
    return {2: [str(tiny_llama(6, 2, 128, 2, 384)), biased],
            3: [str(tiny_llama(6, 3, 64, 2, 384)), qwen2, qwen3]}


@pytest.fixture(scope="module")
def ranks(models: Models, tmp_path_factory: pytest.TempPathFactory
          ) -> list[dict[int, dict[str, Any]]]:
    """What each of 3 ranks saw running the models over 2 ranks and over 3: one spawn."""
    return _spawn_ranks(models, tmp_path_factory.mktemp("ranks"))


@pytest.mark.parametrize("world", [2, 3])
def test_shards_give_the_unsharded_logits(world: int, models: Models, ranks) -> None:
    for path in models[world]:
        reference = _build(path, None)
        ref_logits, ref_tokens = _run_script(reference, reference.model.vocab_size)
        config = reference.model.config
        for rank, seen in enumerate(ranks[:world]):
            got = seen[world][path]
            assert got["tokens"] == ref_tokens, (path, rank)
            for step, (tp, ref) in enumerate(zip(got["logits"], ref_logits, strict=True)):
                assert tp.dtype == torch.float32 and tp.shape == ref.shape, (path, rank, step)
                assert torch.allclose(tp, ref, rtol=1e-4, atol=1e-4), \
                    (path, rank, step, (tp - ref).abs().max().item())
            assert got["num_kv_heads"] == got["cache_heads"] == \
                config.num_key_value_heads // world
            assert got["vocab_size"] == config.vocab_size
            assert got["lm_head_rows"] == -(-config.vocab_size // world)
            heads, kv, head_dim = (config.num_attention_heads // world,
                                   config.num_key_value_heads // world,
                                   reference.model.head_dim)
            hidden, mlp = config.hidden_size, config.intermediate_size // world
            assert got["layer"] == {"qkv": ((heads + 2 * kv) * head_dim, hidden),
                                    "o_proj": (hidden, heads * head_dim),
                                    "gate": (mlp, hidden), "down": (hidden, mlp)}
    assert all(world not in seen for seen in ranks[world:])
    for seen in ranks[:world]:
        stats = seen[world]["stats"]
        # Per step and model: an all-reduce for the embedding, two per layer, one gather.
        assert stats.calls == len(models[world]) * 6 * (1 + 2 * 2 + 1)
        assert stats.bytes > 0 and stats.ns > 0
        bf16, fp16, gathered = seen[world]["half"]
        total = sum(r + 1.5 for r in range(world))
        assert bf16.dtype == torch.bfloat16 and fp16.dtype == torch.float16
        assert bf16.tolist() == fp16.tolist() == [total] * 3
        assert gathered.dtype == torch.bfloat16
        assert gathered.tolist() == [[r for r in range(world) for _ in range(2)]] * 2


def test_a_group_of_one_is_the_unsharded_model(models: Models) -> None:
    path = models[2][1]
    alone = _build(path, None)
    one = _build(path, ParallelGroup(0, 1, None))
    assert one.model.lm_head.shape == alone.model.lm_head.shape
    for a, b in zip(_run_script(alone, alone.model.vocab_size)[0],
                    _run_script(one, one.model.vocab_size)[0], strict=True):
        assert torch.equal(a, b)


def test_shapes_that_do_not_split_are_refused(smollm: LoadedModel) -> None:
    config = smollm.config  # SmolLM2-135M: 9 query heads, 3 KV heads, MLP width 1536
    with pytest.raises(ValueError, match=r"tensor_parallel_size=2 does not divide the model: "
                       r"9 query heads \(num_attention_heads\), 3 KV heads "
                       r"\(num_key_value_heads\) not divisible by 2"):
        check_tensor_parallel(config, 2)
    with pytest.raises(ValueError, match=r"1536 intermediate size .* not divisible by 9"):
        check_tensor_parallel(config, 9)
    check_tensor_parallel(config, 3)
    check_tensor_parallel(config, 1)
    for bad in (0, -1, 2.0, True):
        with pytest.raises(ValueError, match="tensor_parallel_size must be an integer"):
            check_tensor_parallel(config, bad)  # type: ignore[arg-type]
    falcon = FalconConfig(num_attention_heads=4, num_kv_heads=2, new_decoder_architecture=True)
    check_tensor_parallel(falcon, 1)
    with pytest.raises(ValueError, match=r"supports the Llama family \(llama, mistral, qwen2, "
                       r"qwen3\); falcon cannot be split \(tensor_parallel_size=2\)"):
        check_tensor_parallel(falcon, 2)
    with pytest.raises(ValueError, match="falcon cannot be split"):
        build_model(falcon, {}, torch.float32, "cpu", ParallelGroup(0, 2, None))
    with pytest.raises(ValueError, match="tensor_parallel_size=2 does not divide"):
        build_model(config, {}, torch.float32, "cpu", ParallelGroup(0, 2, None))
