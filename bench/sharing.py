"""What sharing KV blocks saves, each case against its no-sharing baseline in the same run.

(a) **Prefix caching.** Requests that share a long prefix (1024 tokens, then 32 tokens of their
    own, 64 output tokens, greedy, EOS ignored) run once with ``enable_prefix_caching=False``
    and once with it on, in fresh engines on the same weights. Reported: prompt tokens run
    through the model (prefilled) and generated tokens per second of each, and their ratios.
    The outputs of the two runs must be identical.

(b) **Forking: beam search (width 4) and parallel sampling (n = 4)** on 32 prompts (lengths
    16-256, 64 output tokens, EOS ignored). The engine is stepped by hand; after every step
    it records the blocks in use and the blocks the same live sequences would hold without
    sharing (each sequence's own table length, summed: what it would need with a private copy
    of every block it references). Reported: the peaks of both and the saving
    ``1 - peak shared / peak unshared``. Prefix caching is off here, so the saving is the
    forking's alone.

The machine is shared and noisy: compare the ratios, not absolute rates. The run records how
much CPU other processes took (see ``pagedserve.bench.throughput``).

Usage (from the repository root)::

    python -m pagedserve.bench.sharing [--quick] [--out FILE]
"""

from __future__ import annotations

import argparse
import json
import random
import sys
import time
from dataclasses import asdict, dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import torch

from pagedserve import LLM, SamplingParams
from pagedserve.bench.throughput import ContentionMonitor, git_state
from pagedserve.model.loader import LoadedModel, load_model

DEFAULT_OUT = Path(__file__).resolve().parent / "results" / "sharing.json"
SEED = 0


@dataclass(frozen=True)
class Spec:
    prefix_requests: int
    prefix_len: int
    unique_len: int
    prefix_output_len: int
    fork_prompts: int
    fork_prompt_min: int
    fork_prompt_max: int
    fork_output_len: int
    width: int = 4


FULL = Spec(prefix_requests=64, prefix_len=1024, unique_len=32, prefix_output_len=64,
            fork_prompts=32, fork_prompt_min=16, fork_prompt_max=256, fork_output_len=64)
QUICK = Spec(prefix_requests=8, prefix_len=128, unique_len=8, prefix_output_len=8,
             fork_prompts=4, fork_prompt_min=16, fork_prompt_max=48, fork_output_len=8)

ENGINE_ARGS: dict[str, Any] = {"kv_cache_bytes": 2**30, "max_num_seqs": 128,
                               "max_num_batched_tokens": 2048}


def _random_tokens(rng: random.Random, n: int, vocab: int) -> list[int]:
    # Skip the first ids: special tokens (BOS, EOS, chat markers) live there.
    return [rng.randrange(100, vocab) for _ in range(n)]


# ----------------------------------------------------------------------------- (a) prefix cache


@dataclass
class PrefixRun:
    enable_prefix_caching: bool
    wall_s: float
    generated_tokens: int
    tokens_per_s: float
    num_prefilled_tokens: int
    prefix_cache_hit_tokens: int


def run_prefix(loaded: LoadedModel, prompts: list[list[int]], output_len: int,
               caching: bool) -> tuple[PrefixRun, list[list[int]]]:
    llm = LLM(loaded=loaded, enable_prefix_caching=caching, **ENGINE_ARGS)
    params = SamplingParams(temperature=0, max_tokens=output_len, ignore_eos=True)
    start = time.perf_counter()
    outputs = llm.generate(prompt_token_ids=prompts, sampling_params=params, use_tqdm=False)
    wall = time.perf_counter() - start
    stats = llm.stats()
    ids = [o.outputs[0].token_ids for o in outputs]
    generated = sum(len(i) for i in ids)
    return PrefixRun(caching, wall, generated, generated / wall, stats.num_prefilled_tokens,
                     stats.prefix_cache_hit_tokens), ids


# ----------------------------------------------------------------------------------- (b) forks


@dataclass
class ForkRun:
    case: str
    peak_blocks_used: int
    peak_blocks_unshared: int
    saving: float
    num_cow_copies: int
    wall_s: float


def run_fork(loaded: LoadedModel, prompts: list[list[int]], params: SamplingParams,
             case: str) -> ForkRun:
    llm = LLM(loaded=loaded, enable_prefix_caching=False, **ENGINE_ARGS)
    core = llm.engine
    for i, prompt in enumerate(prompts):
        core.add_request(core.make_request(f"{case}-{i}", None, params, prompt))
    peak_used = peak_unshared = 0
    start = time.perf_counter()
    while core.has_unfinished_requests:
        core.step()
        used = core.block_manager.num_used_blocks
        unshared = sum(len(s.block_table) for r in core.scheduler.running for s in r.live_seqs)
        peak_used = max(peak_used, used)
        peak_unshared = max(peak_unshared, unshared)
    wall = time.perf_counter() - start
    assert core.block_manager.num_used_blocks == 0, "blocks leaked"
    return ForkRun(case, peak_used, peak_unshared, 1 - peak_used / peak_unshared,
                   core.block_manager.stats.cow_copies, wall)


# ---------------------------------------------------------------------------------------- main


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n", 1)[0])
    parser.add_argument("--quick", action="store_true", help="a small workload, for CI")
    parser.add_argument("--out", type=Path, default=DEFAULT_OUT,
                        help=f"where to write the JSON result (default: {DEFAULT_OUT})")
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    spec = QUICK if args.quick else FULL
    torch.manual_seed(SEED)
    rng = random.Random(SEED)
    monitor = ContentionMonitor()
    loaded = load_model()
    vocab = int(loaded.config.vocab_size)

    prefix = _random_tokens(rng, spec.prefix_len, vocab)
    prefix_prompts = [prefix + _random_tokens(rng, spec.unique_len, vocab)
                      for _ in range(spec.prefix_requests)]
    print(f"(a) {len(prefix_prompts)} requests: {spec.prefix_len}-token shared prefix + "
          f"{spec.unique_len} own tokens, {spec.prefix_output_len} output tokens", flush=True)
    off, off_ids = run_prefix(loaded, prefix_prompts, spec.prefix_output_len, caching=False)
    print(f"    caching off: {off.tokens_per_s:.1f} tok/s, {off.num_prefilled_tokens} "
          f"prefilled ({off.wall_s:.1f} s)", flush=True)
    on, on_ids = run_prefix(loaded, prefix_prompts, spec.prefix_output_len, caching=True)
    print(f"    caching on:  {on.tokens_per_s:.1f} tok/s, {on.num_prefilled_tokens} "
          f"prefilled ({on.wall_s:.1f} s)", flush=True)
    prefill_reduction = off.num_prefilled_tokens / on.num_prefilled_tokens
    speedup = on.tokens_per_s / off.tokens_per_s
    identical = on_ids == off_ids

    fork_prompts = [_random_tokens(rng, rng.randint(spec.fork_prompt_min, spec.fork_prompt_max),
                                   vocab) for _ in range(spec.fork_prompts)]
    print(f"(b) {len(fork_prompts)} prompts, {spec.fork_output_len} output tokens, "
          f"width {spec.width}", flush=True)
    beam = run_fork(loaded, fork_prompts, SamplingParams(
        beam_width=spec.width, max_tokens=spec.fork_output_len, ignore_eos=True), "beam")
    print(f"    beam search: peak {beam.peak_blocks_used} blocks vs {beam.peak_blocks_unshared} "
          f"unshared: {beam.saving:.1%} fewer", flush=True)
    parallel = run_fork(loaded, fork_prompts, SamplingParams(
        n=spec.width, temperature=0.8, seed=SEED, max_tokens=spec.fork_output_len,
        ignore_eos=True), "parallel")
    print(f"    n = {spec.width}:       peak {parallel.peak_blocks_used} blocks vs "
          f"{parallel.peak_blocks_unshared} unshared: {parallel.saving:.1%} fewer", flush=True)
    contention = monitor.stop()

    print()
    print("=" * 72)
    print(f"prefix    {prefill_reduction:9.1f}x fewer prefilled tokens  (target >= 10x)")
    print(f"prefix    {speedup:9.2f}x throughput with caching on   (target >= 3x)")
    print(f"prefix    outputs identical with caching on and off: {identical}")
    print(f"beam      {beam.saving:9.1%} fewer peak KV blocks, width {spec.width} "
          "(target >= 40%)")
    print(f"n={spec.width}       {parallel.saving:9.1%} fewer peak KV blocks")
    if contention.others_fraction_of_machine is not None:
        print(f"others    {contention.others_fraction_of_machine:9.1%}  of the CPU taken by "
              "other processes during the run")
        if contention.others_fraction_of_machine > 0.1:
            print("warning: the CPU was shared with other work; throughput is skewed",
                  file=sys.stderr)
    print("=" * 72)

    result = {
        "benchmark": "sharing",
        "timestamp": datetime.now(UTC).isoformat(),
        "quick": args.quick,
        "spec": asdict(spec),
        "engine_args": ENGINE_ARGS,
        "prefix": {"off": asdict(off), "on": asdict(on),
                   "prefilled_reduction": prefill_reduction, "throughput_ratio": speedup,
                   "outputs_identical": identical},
        "beam_search": asdict(beam),
        "parallel_sampling": asdict(parallel),
        "contention": asdict(contention),
        "git": git_state(),
        "torch": torch.__version__,
        "torch_threads": torch.get_num_threads(),
    }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=2) + "\n")
    print(f"wrote {args.out}")
    return 0 if identical else 1


if __name__ == "__main__":
    sys.exit(main())
