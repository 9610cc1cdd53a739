"""Multi-LoRA throughput: a batch mixing 8 adapters against the base model alone, same run.

Eight rank-16 adapters of every projection (q, k, v, o, gate, up, down) are made with ``peft``
on the embedded SmolLM2-135M-Instruct. The same prompts (random tokens, greedy, EOS ignored)
run three ways, each in its own engine on the same weights, interleaved ``--repeat`` times so
that a noisy machine's slow spells fall on all of them:

* **base**: an engine without LoRA, every request on the base model (the baseline);
* **mixed**: an engine with ``enable_lora``, ``max_loras=8``, the requests spread over the
  eight adapters in turn (every step runs all eight);
* **lora-idle**: the LoRA engine serving base-model requests only (what enabling LoRA costs
  the requests that use none).

Every run starts with an empty prefix cache, so each computes its prompts. Reported:
generated tokens per second of each (median over the repeats) and the ratios to base; target
mixed / base >= 0.80. The machine's ISA flags and the CPU other processes took
are printed beside the figures.

Usage (from the repository root)::

    python -m pagedserve.bench.lora [--quick] [--repeat N] [--out FILE]
"""

from __future__ import annotations

import argparse
import json
import random
import statistics
import sys
import tempfile
import time
from dataclasses import asdict, dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import torch

from pagedserve import LLM, LoRARequest, SamplingParams
from pagedserve.bench.cpu_steal import ContentionMonitor
from pagedserve.bench.throughput import git_state
from pagedserve.model.dtypes import cpu_flags
from pagedserve.model.loader import LoadedModel, load_model

DEFAULT_OUT = Path(__file__).resolve().parent / "results" / "lora.json"
MODULES = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
SEED = 0


@dataclass(frozen=True)
class Spec:
    adapters: int
    rank: int
    requests: int
    prompt_len: int
    output_len: int


FULL = Spec(adapters=8, rank=16, requests=64, prompt_len=64, output_len=64)
QUICK = Spec(adapters=8, rank=16, requests=16, prompt_len=16, output_len=8)


def make_adapters(loaded: LoadedModel, spec: Spec, folder: Path) -> list[LoRARequest]:
    """``spec.adapters`` PEFT adapters of the model, with non-zero weights, saved in
    ``folder``."""
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    requests = []
    for i in range(1, spec.adapters + 1):
        torch.manual_seed(SEED + i)
        base = AutoModelForCausalLM.from_pretrained(loaded.path, dtype=torch.float32)
        model = get_peft_model(base, LoraConfig(r=spec.rank, lora_alpha=2 * spec.rank,
                                                target_modules=MODULES,
                                                init_lora_weights=False))
        path = folder / f"adapter{i}"
        model.save_pretrained(str(path))
        requests.append(LoRARequest(f"adapter{i}", i, str(path)))
    return requests


@dataclass
class Run:
    case: str
    wall_s: float
    generated_tokens: int
    tokens_per_s: float


def run(llm: LLM, case: str, prompts: list[list[int]], params: SamplingParams,
        loras: list[LoRARequest | None]) -> Run:
    # Every run computes its prompts: a cache warm from an earlier round would favour the
    # engine whose prefixes all fit in it (the base one: the LoRA engine caches two sets).
    llm.reset_prefix_cache()
    start = time.perf_counter()
    outputs = llm.generate(prompt_token_ids=prompts, sampling_params=params, use_tqdm=False,
                           lora_request=loras)
    wall = time.perf_counter() - start
    generated = sum(len(o.outputs[0].token_ids) for o in outputs)
    return Run(case, wall, generated, generated / wall)


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n", 1)[0])
    parser.add_argument("--quick", action="store_true", help="a small workload, for CI")
    parser.add_argument("--repeat", type=int, default=3, help="interleaved rounds (default 3)")
    parser.add_argument("--dtype", default="float32", help="the engines' dtype")
    parser.add_argument("--out", type=Path, default=DEFAULT_OUT,
                        help=f"where to write the JSON result (default: {DEFAULT_OUT})")
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    spec = QUICK if args.quick else FULL
    rng = random.Random(SEED)
    loaded = load_model()
    vocab = int(loaded.config.vocab_size)
    prompts = [[rng.randrange(100, vocab) for _ in range(spec.prompt_len)]
               for _ in range(spec.requests)]
    params = SamplingParams(temperature=0, max_tokens=spec.output_len, ignore_eos=True)
    isa = sorted(f for f in cpu_flags() if "avx" in f or "amx" in f)
    print(f"ISA: {' '.join(isa) or 'unknown'}; torch threads {torch.get_num_threads()}",
          flush=True)
    engine_args: dict[str, Any] = {"dtype": args.dtype, "kv_cache_bytes": 2**29,
                                   "max_num_seqs": spec.requests}
    with tempfile.TemporaryDirectory(prefix="pagedserve-lora-bench-") as folder:
        adapters = make_adapters(loaded, spec, Path(folder))
        base_llm = LLM(loaded=loaded, **engine_args)
        lora_llm = LLM(loaded=loaded, enable_lora=True, max_loras=spec.adapters,
                       max_lora_rank=spec.rank, **engine_args)
        mixed_loras: list[LoRARequest | None] = [adapters[i % len(adapters)]
                                                 for i in range(spec.requests)]
        none: list[LoRARequest | None] = [None] * spec.requests
        # Warm-up: first steps, adapters read into the cache and slots.
        run(lora_llm, "warm", prompts[:spec.adapters], params, mixed_loras[:spec.adapters])
        run(base_llm, "warm", prompts[:1], params, none[:1])
        monitor = ContentionMonitor()
        runs: dict[str, list[Run]] = {"base": [], "mixed": [], "lora-idle": []}
        for round_ in range(args.repeat):
            for case, llm, loras in (("base", base_llm, none), ("mixed", lora_llm, mixed_loras),
                                     ("lora-idle", lora_llm, none)):
                measured = run(llm, case, prompts, params, loras)
                runs[case].append(measured)
                print(f"round {round_ + 1} {case:9s} {measured.tokens_per_s:8.1f} tok/s "
                      f"({measured.wall_s:.1f} s)", flush=True)
        contention = monitor.stop()
    median = {case: statistics.median(r.tokens_per_s for r in rs) for case, rs in runs.items()}
    mixed_ratio = median["mixed"] / median["base"]
    idle_ratio = median["lora-idle"] / median["base"]
    print()
    print("=" * 72)
    print(f"{spec.adapters} adapters, rank {spec.rank}, {spec.requests} requests of "
          f"{spec.prompt_len} + {spec.output_len} tokens, {args.dtype}; ISA {' '.join(isa)}")
    print(f"base       {median['base']:9.1f} tok/s")
    print(f"mixed      {median['mixed']:9.1f} tok/s  {mixed_ratio:6.1%} of base  (target >= 80%)")
    print(f"lora-idle  {median['lora-idle']:9.1f} tok/s  {idle_ratio:6.1%} of base")
    if contention.others_fraction_of_machine is not None:
        print(f"others     {contention.others_fraction_of_machine:9.1%} of the CPU taken by "
              "other processes during the run")
    print("=" * 72)
    result = {
        "benchmark": "lora", "timestamp": datetime.now(UTC).isoformat(), "quick": args.quick,
        "spec": asdict(spec), "dtype": args.dtype, "isa": isa,
        "runs": {case: [asdict(r) for r in rs] for case, rs in runs.items()},
        "median_tokens_per_s": median, "mixed_over_base": mixed_ratio,
        "lora_idle_over_base": idle_ratio, "contention": asdict(contention),
        "git": git_state(), "torch": torch.__version__, "torch_threads": torch.get_num_threads(),
    }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=2) + "\n")
    print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
