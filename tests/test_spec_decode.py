"""Speculative decoding by prompt lookup (``speculative_config={"method": "ngram", ...}``).

The proposer alone; the settings (``EngineConfig``, ``model.json``, the generate command); the
scheduler's drafts and the blocks of rejected ones; then whole engines on tiny random Llamas
with a 96-token vocabulary, against the same engine without speculation: greedy outputs,
logprobs, stops and streamed deltas must be identical, and drafts must really be accepted.

With their attention and MLP outputs scaled down (``mix``), the tiny models continue mostly as
their last token says, so their greedy outputs fall into loops that the n-gram lookup predicts,
and leave them where the context says otherwise: drafts are both accepted and rejected.
"""

from __future__ import annotations

import json
import math
import random
from pathlib import Path
from typing import Any

import pytest
import torch
from prometheus_client import CollectorRegistry
from transformers import LlamaConfig, LlamaForCausalLM

from pagedserve import LLM, SamplingParams
from pagedserve.__main__ import main
from pagedserve.config import EngineConfig, SpeculativeConfig
from pagedserve.engine.block_manager import BlockManager
from pagedserve.engine.core import EngineCore
from pagedserve.engine.detokenizer import IncrementalDetokenizer
from pagedserve.engine.metrics import EngineMetrics, MetricFamilies
from pagedserve.engine.ngram_proposer import NgramProposer
from pagedserve.engine.scheduler import Scheduler
from pagedserve.engine.sequence import Request, Sequence
from pagedserve.engine.stats import FinishedRequest, RequestInfo, StepStats
from pagedserve.model.loader import LoadedModel, load_model
from pagedserve.outputs import RequestOutput
from pagedserve.repository.engine_args import engine_config
from pagedserve.repository.errors import RepositoryError
from pagedserve.repository.model_config import load_config
from tests.conftest import assert_all_blocks_free

VOCAB = 96
NGRAM: dict[str, Any] = {"method": "ngram", "num_speculative_tokens": 4, "prompt_lookup_max": 3,
         "prompt_lookup_min": 1}


# ---- the proposer --------------------------------------------------------------------------


def test_proposes_what_followed_the_most_recent_match() -> None:
    proposer = NgramProposer(1, 3)
    assert proposer.propose([1, 2, 3, 9, 1, 2, 4, 8, 1, 2], 3) == [4, 8, 1]
    assert proposer.propose([1, 2, 3, 9, 1, 2, 4, 8, 1, 2], 1) == [4]
    # The continuation ends where the list does.
    assert proposer.propose([5, 6, 7, 5, 6], 4) == [7, 5, 6]


def test_a_longer_match_wins_over_a_more_recent_one() -> None:
    proposer = NgramProposer(1, 3)
    # "7 8 9" occurs once, early; "9" alone occurs later, followed by 4.
    tokens = [7, 8, 9, 1, 2, 9, 4, 5, 7, 8, 9]
    assert proposer.propose(tokens, 2) == [1, 2]
    # Capped at max_n: the two-token suffix "8 9" matches at both places; the latest wins.
    assert NgramProposer(1, 2).propose([8, 9, 1, 0, 8, 9, 2, 3, 8, 9], 1) == [2]


def test_no_proposal_below_min_n_or_without_room() -> None:
    assert NgramProposer(2, 3).propose([1, 2, 3, 4, 5, 3], 2) == []  # only "3" recurs
    assert NgramProposer(1, 3).propose([1, 2, 3, 4, 5, 3], 2) == [4, 5]
    assert NgramProposer(1, 3).propose([1, 2, 3], 4) == []  # nothing recurs
    assert NgramProposer(1, 3).propose([4, 4], 0) == []
    assert NgramProposer(1, 3).propose([4], 3) == []
    assert NgramProposer(1, 3).propose([], 3) == []
    # A repeated token: the match may overlap the suffix itself.
    assert NgramProposer(1, 4).propose([4, 4, 4], 3) == [4]


def test_matches_a_brute_force_search() -> None:
    """The vectorised search against the definition, on random lists with many repeats."""
    rng = random.Random(0)

    def reference(tokens: list[int], k: int, min_n: int, max_n: int) -> list[int]:
        for n in range(min(max_n, len(tokens) - 1), min_n - 1, -1):
            suffix = tokens[-n:]
            for start in range(len(tokens) - n - 1, -1, -1):
                if tokens[start: start + n] == suffix:
                    return tokens[start + n: start + n + k]
        return []

    for _ in range(500):
        tokens = [rng.randrange(4) for _ in range(rng.randrange(0, 30))]
        min_n = rng.randrange(1, 4)
        max_n = rng.randrange(min_n, 6)
        k = rng.randrange(0, 6)
        assert NgramProposer(min_n, max_n).propose(tokens, k) == reference(
            tokens, k, min_n, max_n), (tokens, k, min_n, max_n)


def test_proposer_bounds_are_checked() -> None:
    with pytest.raises(ValueError, match="min_n=3, max_n=2"):
        NgramProposer(3, 2)


# ---- settings ------------------------------------------------------------------------------


def test_speculative_config_as_vllm_spells_it() -> None:
    config = EngineConfig(speculative_config=dict(NGRAM))
    assert config.speculative_config == SpeculativeConfig(4, "ngram", 3, 1)
    # vLLM's defaults: both bounds 5, or the one given for both.
    assert (SpeculativeConfig(2).min_n, SpeculativeConfig(2).max_n) == (5, 5)
    assert (SpeculativeConfig(2, prompt_lookup_max=3).min_n,
            SpeculativeConfig(2, prompt_lookup_min=2).max_n) == (3, 2)
    assert EngineConfig().speculative_config is None


@pytest.mark.parametrize(("values", "message"), [
    ({"method": "eagle", "num_speculative_tokens": 2},
     "speculative_config.method must be 'ngram', got 'eagle'"),
    ({"method": "ngram"}, "speculative_config.num_speculative_tokens is required"),
    ({"num_speculative_tokens": 2}, "speculative_config.method is required"),
    ({"method": "ngram", "num_speculative_tokens": 0},
     r"speculative_config.num_speculative_tokens must be in \[1, 128\], got 0"),
    ({"method": "ngram", "num_speculative_tokens": 1.5},
     "speculative_config.num_speculative_tokens must be an integer, got 1.5"),
    ({"method": "ngram", "num_speculative_tokens": 2, "prompt_lookup_min": 0},
     "speculative_config.prompt_lookup_min must be in"),
    ({"method": "ngram", "num_speculative_tokens": 2, "prompt_lookup_max": 2,
      "prompt_lookup_min": 3},
     r"speculative_config.prompt_lookup_min \(3\) must be at most prompt_lookup_max \(2\)"),
    ({"method": "ngram", "num_speculative_tokens": 2, "model": "draft"},
     "speculative_config.model is not supported"),
])
def test_bad_speculative_config(values: dict[str, object], message: str) -> None:
    with pytest.raises(ValueError, match=message):
        EngineConfig(speculative_config=values)  # type: ignore[arg-type]


def test_speculative_config_from_model_json_and_parameters(tmp_path: Path) -> None:
    folder = tmp_path / "m"
    (folder / "1").mkdir(parents=True)
    (folder / "config.pbtxt").write_text('backend: "vllm"')
    (folder / "1" / "model.json").write_text(json.dumps({"speculative_config": NGRAM}))
    assert engine_config(load_config(folder), folder / "1").speculative_config == \
        SpeculativeConfig(4, "ngram", 3, 1)
    (folder / "1" / "model.json").write_text(json.dumps(
        {"speculative_config": {"method": "ngram", "num_speculative_tokens": -1}}))
    with pytest.raises(RepositoryError, match="num_speculative_tokens must be in"):
        engine_config(load_config(folder), folder / "1")
    # A config parameter holds the same dict as a JSON string.
    (folder / "1" / "model.json").unlink()
    parameter = json.dumps(NGRAM).replace('"', '\\"')
    (folder / "config.pbtxt").write_text(
        'backend: "vllm" parameters { key: "speculative_config" '
        f'value {{ string_value: "{parameter}" }} }}')
    assert engine_config(load_config(folder), folder / "1").speculative_config == \
        SpeculativeConfig(4, "ngram", 3, 1)
    (folder / "config.pbtxt").write_text(
        'backend: "vllm" parameters { key: "speculative_config" '
        'value { string_value: "ngram" } }')
    with pytest.raises(RepositoryError, match="'speculative_config' must be of type JSON"):
        engine_config(load_config(folder), folder / "1")


def test_generate_command_takes_the_flag(capsys: pytest.CaptureFixture[str]) -> None:
    """Refused by the settings before any weights load: the flag reaches them."""
    assert main(["generate", "hi", "--speculative-ngram", "0"]) == 2
    assert "speculative_config.num_speculative_tokens must be in" in capsys.readouterr().err


def test_spec_counters_reach_prometheus() -> None:
    registry = CollectorRegistry()
    observer = EngineMetrics(MetricFamilies(registry), "m", 1)
    step = StepStats(step=1, start_ns=0, scheduled_ns=1, forwarded_ns=2, sampled_ns=3,
                     end_ns=4, num_running=1, num_waiting=0, num_preempted=0,
                     num_prefill_tokens=0, num_decode_tokens=5, num_scheduled_seqs=1,
                     num_generated_tokens=3, num_blocks_used=1, num_blocks_free=9,
                     num_blocks_cached=0, num_blocks_total=10, prefix_cache_queried_tokens=0,
                     prefix_cache_hit_tokens=0, num_cow_copies=0, num_evictions=0,
                     request_ids=("a",), num_draft_tokens=4, num_accepted_tokens=2)
    observer.on_step(step)
    observer.on_step(step)
    labels = {"model_name": "m", "engine": "1"}
    assert registry.get_sample_value("vllm:spec_decode_num_draft_tokens_total", labels) == 8
    assert registry.get_sample_value("vllm:spec_decode_num_accepted_tokens_total", labels) == 4


# ---- the scheduler's drafts and their blocks ------------------------------------------------


class _StubTokenizer:
    def decode(self, ids: list[int], skip_special_tokens: bool = True) -> str:
        return "".join(chr(0x41 + i % 26) for i in ids)


def _decoding_seq(tokens: list[int], params: SamplingParams) -> Sequence:
    """A running sequence whose prompt is ``tokens[:-1]`` and whose first output token,
    ``tokens[-1]``, is still to be computed."""
    prompt = tokens[:-1]
    request = Request("r", None, prompt, params, 0, max_model_len=1000)
    seq = Sequence(seq_id=0, request=request, index=0, token_ids=list(prompt),
                   num_prompt_tokens=len(prompt),
                   detokenizer=IncrementalDetokenizer(_StubTokenizer(), prompt))  # type: ignore[arg-type]
    request.seqs.append(seq)
    return seq


def _scheduler(spec: dict[str, object] | None, budget: int = 64, blocks: int = 64) -> Scheduler:
    config = EngineConfig(block_size=4, max_num_batched_tokens=budget,
                          speculative_config=spec)  # type: ignore[arg-type]
    return Scheduler(config, BlockManager(blocks, 4))


def _prefilled(sched: Scheduler, tokens: list[int], params: SamplingParams) -> Sequence:
    """Runs the prompt's prefill and appends the last token as its sampled one."""
    seq = _decoding_seq(tokens, params)
    sched.add(seq.request)
    while seq.num_computed_tokens < seq.num_prompt_tokens:  # in chunks under a small budget
        sched.commit(sched.schedule())
    seq.token_ids.append(tokens[-1])
    return seq


LOOP = [3, 4, 5, 6, 7, 3, 4, 5, 6, 7, 3]  # 10 prompt tokens, then 3: drafts 4 5 6 7


def test_drafts_of_a_greedy_decode_and_the_blocks_of_rejected_ones() -> None:
    """Drafts ride on the decode's chunk with its blocks; when all are rejected the blocks
    that held only drafts go back, no block gets a prefix-cache key past the accepted
    tokens, and the pool looks as after a plain step."""
    plain, spec = _scheduler(None), _scheduler(NGRAM)
    greedy = SamplingParams(temperature=0, max_tokens=None)
    seqs = [_prefilled(s, LOOP, greedy) for s in (plain, spec)]
    outs = [s.schedule() for s in (plain, spec)]
    assert [i.draft_token_ids for i in outs[1].scheduled] == [[4, 5, 6, 7]]
    assert outs[1].num_tokens == 5 and outs[1].num_decode_tokens == 5
    chunk = outs[1].model_input.chunks[0]
    assert chunk.token_ids == [3, 4, 5, 6, 7] and chunk.start == 10 and chunk.num_logits == 5
    assert len(chunk.block_table) == 4  # 15 tokens
    assert outs[0].model_input.chunks[0].num_logits == 1
    for sched, seq, out in zip((plain, spec), seqs, outs):
        sched.commit(out)
        assert seq.num_computed_tokens == 11  # drafts count only once accepted
        seq.token_ids.append(9)  # the model disagreed with the first draft
    spec.accept(seqs[1], 0)
    bm = spec.block_manager
    assert seqs[1].num_computed_tokens == 11
    assert len(seqs[1].block_table) == 3 == len(seqs[0].block_table)
    assert bm.num_free_blocks == plain.block_manager.num_free_blocks
    assert len(seqs[1].block_table.keys) == 2 and bm.num_cached_blocks == 2
    # Two accepted drafts and the model's own token: their blocks are kept, and the full
    # ones cached.
    seq = _prefilled(spec := _scheduler(NGRAM), LOOP, greedy)
    spec.commit(spec.schedule())
    seq.token_ids += [4, 5, 9]
    spec.accept(seq, 2)
    assert seq.num_computed_tokens == 13 and len(seq.block_table) == 4
    assert spec.block_manager.num_cached_blocks == 3
    spec.finish(seq)
    assert spec.block_manager.num_free_blocks == spec.block_manager.num_usable_blocks


@pytest.mark.parametrize(("params", "budget", "blocks", "drafts"), [
    (SamplingParams(temperature=0, max_tokens=None), 64, 64, [4, 5, 6, 7]),
    (SamplingParams(temperature=0, max_tokens=None), 3, 64, [4, 5]),  # the token budget
    (SamplingParams(temperature=0, max_tokens=3), 64, 64, [4]),  # drafts + 1 <= 2 left
    (SamplingParams(temperature=0, max_tokens=1), 64, 64, []),
    # No free block: the room left in the last one (positions 10 and 11 of blocks of 4).
    (SamplingParams(temperature=0, max_tokens=None), 64, 4, [4]),
    (SamplingParams(temperature=0.8, seed=1, max_tokens=None), 64, 64, []),  # sampled
    (SamplingParams(temperature=0, beam_width=2, max_tokens=None), 64, 64, []),
])
def test_who_gets_drafts(params: SamplingParams, budget: int, blocks: int,
                         drafts: list[int]) -> None:
    sched = _scheduler(NGRAM, budget, blocks)
    _prefilled(sched, LOOP, params)
    out = sched.schedule()
    assert out.scheduled[0].draft_token_ids == drafts
    assert out.num_tokens <= budget
    # Without blocks for drafts the decode still runs, and nobody is preempted for them.
    assert out.scheduled[0].num_new_tokens == 1 + len(drafts) and not out.preempted


# ---- whole engines ---------------------------------------------------------------------------


@pytest.fixture(scope="module")
def loopy(tmp_path_factory: pytest.TempPathFactory, smollm: LoadedModel) -> LoadedModel:
    return _tiny_model(tmp_path_factory, smollm, mix=0.02)


@pytest.fixture(scope="module")
def fixed_loop(tmp_path_factory: pytest.TempPathFactory, smollm: LoadedModel) -> LoadedModel:
    """Attention and MLP outputs zeroed: the next token depends on the last one only."""
    return _tiny_model(tmp_path_factory, smollm, mix=0.0)


def _tiny_model(tmp_path_factory: pytest.TempPathFactory, smollm: LoadedModel,
                mix: float) -> LoadedModel:
    torch.manual_seed(0)
    config = LlamaConfig(vocab_size=VOCAB, hidden_size=128, intermediate_size=256,
                         num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
                         head_dim=32, max_position_embeddings=1024, initializer_range=0.15,
                         bos_token_id=1, eos_token_id=2, pad_token_id=2)
    model = LlamaForCausalLM(config)
    with torch.no_grad():
        for layer in model.model.layers:
            layer.self_attn.o_proj.weight.mul_(mix)
            layer.mlp.down_proj.weight.mul_(mix)
    path = tmp_path_factory.mktemp("tiny-loopy")
    model.save_pretrained(path)
    smollm.tokenizer.save_pretrained(path)
    return load_model(str(path))


def _llm(loaded: LoadedModel, spec: dict[str, object] | None, **engine_args: object) -> LLM:
    return LLM(loaded=loaded, dtype="float32", kv_cache_bytes=2**21, block_size=4,
               speculative_config=spec, **engine_args)


def _prompts(seed: int) -> list[list[int]]:
    """Random prompts, the same repeated three times, and one with a long shared prefix
    (prefix caching serves it to the second)."""
    rng = random.Random(seed)
    prompts = [[rng.randrange(3, VOCAB) for _ in range(n)] for n in (5, 13, 30)]
    prompts += [p * 3 for p in prompts]
    prompts += [prompts[-1] + [7, 8]]
    return prompts


def _same(a: RequestOutput, b: RequestOutput) -> None:
    for x, y in zip(a.outputs, b.outputs, strict=True):
        assert x.token_ids == y.token_ids
        assert x.text == y.text
        assert (x.finish_reason, x.stop_reason) == (y.finish_reason, y.stop_reason)
        assert x.cumulative_logprob == pytest.approx(y.cumulative_logprob, abs=1e-3)
        if x.logprobs is None or y.logprobs is None:
            assert x.logprobs is y.logprobs
            continue
        assert [sorted(p) for p in x.logprobs] == [sorted(p) for p in y.logprobs]
        for p, q in zip(x.logprobs, y.logprobs):
            assert [p[t] for t in sorted(p)] == pytest.approx([q[t] for t in sorted(q)],
                                                              abs=1e-3)


def test_greedy_outputs_are_those_without_speculation(loopy: LoadedModel) -> None:
    """A batch of greedy requests (plain, with logprobs, with a repetition penalty, with
    min_tokens) beside seeded sampling ones (n = 1 and 2), some sharing prefixes: every
    output as without speculation, with drafts both accepted and rejected;
    every block back in the pool at the end."""
    prompts = _prompts(1)
    greedy = SamplingParams(temperature=0, max_tokens=32, ignore_eos=True)
    kinds = [greedy,
             SamplingParams(temperature=0, max_tokens=23, logprobs=2),
             SamplingParams(temperature=0, max_tokens=30, repetition_penalty=1.3,
                            ignore_eos=True),
             SamplingParams(temperature=0, max_tokens=30, min_tokens=20),
             SamplingParams(temperature=0.8, seed=3, max_tokens=30, ignore_eos=True),
             SamplingParams(temperature=1.0, seed=4, n=2, max_tokens=20, ignore_eos=True)]
    params = [kinds[i % len(kinds)] for i in range(len(prompts))] + [greedy] * 3
    prompts += prompts[:3]
    results, stats = [], []
    for spec in (None, NGRAM):
        llm = _llm(loopy, spec)
        results.append(llm.generate(prompt_token_ids=prompts, sampling_params=params,
                                    use_tqdm=False))
        stats.append(llm.stats())
        assert_all_blocks_free(llm)
    for a, b in zip(*results, strict=True):
        _same(a, b)
    plain, spec = stats
    assert plain.spec_decode_num_draft_tokens == 0
    assert spec.spec_decode_num_accepted_tokens > 0
    assert spec.spec_decode_num_accepted_tokens < spec.spec_decode_num_draft_tokens / 2


def test_blocks_hold_no_rejected_token_and_deltas_add_up(loopy: LoadedModel) -> None:
    """Stepping a batch of greedy requests by hand: after every step no block of a running
    sequence lies wholly past its computed tokens, its prefix keys cover only those, steps
    report the drafts the engine counts, and the streamed token and text deltas (several
    tokens a step) add up to the final outputs."""
    recorded: list[StepStats] = []

    class Recorder:
        def on_request_added(self, request: RequestInfo) -> None: ...

        def on_step(self, stats: StepStats) -> None:
            recorded.append(stats)

        def on_request_finished(self, request: FinishedRequest) -> None: ...

        def shutdown(self) -> None: ...

    engine = EngineCore(EngineConfig(dtype="float32", kv_cache_bytes=2**21, block_size=4,
                                     speculative_config=SpeculativeConfig(**NGRAM)),
                        loopy, [Recorder()])
    params = SamplingParams(temperature=0, max_tokens=24, ignore_eos=True)
    for i, prompt in enumerate(_prompts(2)):
        engine.add_request(engine.make_request(str(i), None, params, prompt))
    bs = engine.block_manager.block_size
    tokens: dict[str, list[int]] = {}
    texts: dict[str, str] = {}
    final: dict[str, RequestOutput] = {}
    multi = 0
    while engine.has_unfinished_requests:
        for out in engine.step():
            tokens[out.request_id] = tokens.get(out.request_id, []) + out.delta_token_ids[0]
            texts[out.request_id] = texts.get(out.request_id, "") + out.delta_texts[0]
            multi += len(out.delta_token_ids[0]) > 1
            if out.finished:
                final[out.request_id] = out
        for running in engine.scheduler.running:
            for seq in running.live_seqs:
                assert len(seq.block_table) == math.ceil(seq.num_computed_tokens / bs)
                assert len(seq.block_table.keys) == seq.num_computed_tokens // bs
                assert seq.num_computed_tokens == seq.num_tokens - 1
    assert multi > 0
    for request_id, out in final.items():
        assert tokens[request_id] == out.outputs[0].token_ids
        assert texts[request_id] == out.outputs[0].text
    stats = engine.stats()
    assert sum(s.num_draft_tokens for s in recorded) == stats.spec_decode_num_draft_tokens > 0
    assert sum(s.num_accepted_tokens for s in recorded) == \
        stats.spec_decode_num_accepted_tokens > 0
    assert sum(s.num_generated_tokens for s in recorded) == 24 * len(final)
    bm = engine.block_manager
    assert bm.num_free_blocks == bm.num_usable_blocks


def test_stops_inside_an_accepted_run(fixed_loop: LoadedModel) -> None:
    """A prompt that already holds the model's loop has every draft accepted, several tokens
    a step: a stop token, a stop string, max_tokens and the context limit ending the request
    inside such a run end it where the plain engine does."""
    plain = _llm(fixed_loop, None, max_model_len=40)
    first = plain.generate(prompt_token_ids=[[5]], sampling_params=SamplingParams(
        temperature=0, max_tokens=30, ignore_eos=True), use_tqdm=False)[0].outputs[0]
    # The loop the model falls into, and a prompt of it three times.
    ids = first.token_ids
    period = next(p for p in range(1, 16) if ids[-2 * p: -p] == ids[-p:])
    loop = ids[-period:]
    assert 3 <= period <= 10, loop
    prompt = loop * 3
    text = plain.generate(prompt_token_ids=[prompt], sampling_params=SamplingParams(
        temperature=0, max_tokens=2 * period, ignore_eos=True), use_tqdm=False)[0].outputs[0]
    stop_string = text.text[len(text.text) // 2 - 1: len(text.text) // 2 + 1]
    assert len(stop_string) == 2, text
    cases = [SamplingParams(temperature=0, max_tokens=30, stop_token_ids=[loop[2]]),
             SamplingParams(temperature=0, max_tokens=30, stop_token_ids=[loop[2]],
                            include_stop_str_in_output=True),
             SamplingParams(temperature=0, max_tokens=30, stop=[stop_string]),
             SamplingParams(temperature=0, max_tokens=30, stop=[stop_string],
                            include_stop_str_in_output=True),
             SamplingParams(temperature=0, max_tokens=7, ignore_eos=True),
             SamplingParams(temperature=0, max_tokens=None, ignore_eos=True)]  # 40 tokens
    spec = _llm(fixed_loop, NGRAM, max_model_len=40)
    expected, got = (llm.generate(prompt_token_ids=[prompt] * len(cases),
                                  sampling_params=cases, use_tqdm=False)
                     for llm in (plain, spec))
    for a, b in zip(got, expected, strict=True):
        _same(a, b)
    # The step after the prompt's appends the loop's next tokens from the second on: the stop
    # token is the second of them.
    assert expected[0].outputs[0].token_ids == loop[:3]
    assert expected[-1].outputs[0].finish_reason == "length"
    assert len(expected[-1].outputs[0].token_ids) == 40 - len(prompt)
    stats = spec.stats()
    # Every draft was right: the first step after the prompt already appends several tokens.
    assert stats.spec_decode_num_accepted_tokens == stats.spec_decode_num_draft_tokens > 0
    assert_all_blocks_free(spec)
