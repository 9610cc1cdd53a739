"""Structured outputs: a batch with half its requests held to a JSON schema against the same
batch unconstrained, same run.

One engine on the embedded SmolLM2-135M-Instruct (fp32); 32 requests of chat-formatted prompts
asking for a JSON list of records (the same prompts every run), sampled at temperature 0.8 with
a seed per request, EOS ignored, ``max_tokens`` 128. Two cases, interleaved ``--repeat``
times (the order alternating between rounds), each run on an empty prefix cache:

* **free**: all 32 requests unconstrained (the baseline);
* **half**: the even-numbered 16 held to a JSON schema (an object whose ``records`` array
  holds exactly three records of five typed, bounded fields, written compactly), the odd 16
  unconstrained as in ``free``.

The schema is compiled into the engine's cache before any timing (a warm-up run uses it), so
the runs measure the per-step cost of the grammars (each constrained row's bitmask, the
masking of its logits, the matcher's advance), not compilation. Compilation is measured apart:
the schema's first compile in a fresh ``StructuredOutputCompiler`` (its grammar engine reading
the tokenizer's vocabulary included), and the schema alone in a compiler that has read it.

What is fair: a constrained request ends with its grammar (somewhat short of its
``max_tokens`` with this schema) while an unconstrained one runs to ``max_tokens``, so the
cases generate different numbers of tokens and ``half`` ends with steps of fewer rows. Every
figure counts the tokens generated; none assumes them. Three measures, each ``half`` over ``free``:

* **total**: all generated tokens / wall time (the issue's "throughput"; target >= 0.90).
  It charges ``half`` for its short tail of narrower steps, which generate fewer tokens per
  step on this CPU, as well as for the grammars;
* **free requests**: the 16 odd-numbered requests' tokens / the time until the last of them
  finished, against the same 16 requests in ``free`` (target >= 0.98). Both cases generate
  the same tokens for them (EOS ignored), so this is the ratio of the times they took; it
  favours ``half`` slightly, whose last steps run without the finished constrained rows;
* **full batch**: the time until every request had ``k`` tokens, ``k`` the shortest
  constrained output of the round's ``half`` run, against the time ``free`` took to the same
  point: the same steps with the same rows in both, so the per-step cost of the grammars alone.

Every constrained output that ended with its grammar is checked to parse with ``json.loads``.
The machine's ISA flags and the CPU other processes took are printed beside the figures.

Usage (from the repository root)::

    python -m pagedserve.bench.structured [--quick] [--repeat N] [--out FILE]
"""

from __future__ import annotations

import argparse
import itertools
import json
import statistics
import sys
import time
from dataclasses import asdict, dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import torch

from pagedserve import LLM, SamplingParams, StructuredOutputsParams
from pagedserve.bench.cpu_steal import ContentionMonitor
from pagedserve.bench.latency import chat_prompts
from pagedserve.bench.throughput import git_state
from pagedserve.engine.structured_output import StructuredOutputCompiler
from pagedserve.model.dtypes import cpu_flags
from pagedserve.model.loader import load_model

DEFAULT_OUT = Path(__file__).resolve().parent / "results" / "structured.json"
SEED = 0
TEMPERATURE = 0.8
SUBJECTS = ("customers", "employees", "students", "patients", "members", "authors", "players",
            "suppliers")
CASES = ("free", "half")


@dataclass(frozen=True)
class Spec:
    requests: int  # the even-numbered half are constrained in ``half``
    records: int  # the schema's array holds exactly this many
    text_len: int  # the schema's strings' maxLength
    output_len: int


FULL = Spec(requests=32, records=3, text_len=16, output_len=128)
QUICK = Spec(requests=4, records=1, text_len=8, output_len=64)


def record_schema(spec: Spec) -> dict[str, Any]:
    """An object whose ``records`` array holds ``spec.records`` records of five fields: every
    value bounded, so that the output ends with its grammar within ``output_len`` tokens."""
    text = {"type": "string", "minLength": 3, "maxLength": spec.text_len}
    record = {
        "type": "object",
        "properties": {"id": {"type": "integer", "minimum": 1, "maximum": 9999},
                       "name": text, "city": text, "active": {"type": "boolean"},
                       "score": {"type": "integer", "minimum": 0, "maximum": 100}},
        "required": ["id", "name", "city", "active", "score"],
        "additionalProperties": False,
    }
    return {"type": "object",
            "properties": {"records": {"type": "array", "items": record,
                                       "minItems": spec.records, "maxItems": spec.records}},
            "required": ["records"], "additionalProperties": False}


def messages(spec: Spec) -> list[str]:
    """What each request asks for: the record list the schema describes, about a subject
    that changes from request to request."""
    return [f"List {spec.records} {SUBJECTS[i % len(SUBJECTS)]} as JSON on one line: an object "
            f'whose "records" array holds {spec.records} records, each with "id" (an integer), '
            '"name", "city", "active" (true or false) and "score" (0 to 100).'
            for i in range(spec.requests)]


def case_params(spec: Spec, constraint: StructuredOutputsParams, case: str
                ) -> list[SamplingParams]:
    """Request ``i``'s parameters in ``case``: its own seed in every case, the constraint on
    the even-numbered ones in ``half``."""
    return [SamplingParams(temperature=TEMPERATURE, seed=SEED + i, max_tokens=spec.output_len,
                           ignore_eos=True,
                           structured_outputs=constraint if case == "half" and i % 2 == 0
                           else None)
            for i in range(spec.requests)]


@dataclass
class Run:
    case: str
    wall_s: float
    generated_tokens: int
    tokens_per_s: float
    free_tokens: int  # of the odd-numbered requests, unconstrained in both cases
    free_done_s: float
    free_tokens_per_s: float
    constrained: int
    stopped: int  # constrained outputs that ended with their grammar
    parsed: int  # of those, the ones json.loads reads


_IDS = itertools.count()


def run(llm: LLM, case: str, prompts: list[list[int]], params: list[SamplingParams]
        ) -> tuple[Run, list[list[float]]]:
    """One batch to completion, stepped by hand to see when each request got each token;
    also returns those times (seconds from the start), request by request."""
    # Every run computes its prompts: a warm cache would favour whichever case ran second.
    llm.reset_prefix_cache()
    engine = llm.engine
    times: list[list[float]] = [[] for _ in prompts]
    texts: list[str] = [""] * len(prompts)
    reasons: list[str | None] = [None] * len(prompts)
    start = time.perf_counter()
    index: dict[str, int] = {}
    for i, (prompt, p) in enumerate(zip(prompts, params)):
        request = engine.make_request(f"{case}-{next(_IDS)}", None, p, prompt)
        index[request.request_id] = i
        engine.add_request(request)
    while engine.has_unfinished_requests:
        for output in engine.step():
            if output.error is not None:
                raise RuntimeError(f"request {output.request_id} failed: {output.error}")
            now = time.perf_counter() - start
            i = index[output.request_id]
            completion = output.outputs[0]
            times[i].extend([now] * (len(completion.token_ids) - len(times[i])))
            texts[i], reasons[i] = completion.text, completion.finish_reason
    wall = time.perf_counter() - start
    generated = sum(len(t) for t in times)
    free = [i for i in range(len(prompts)) if i % 2 == 1]
    free_tokens = sum(len(times[i]) for i in free)
    free_done = max(times[i][-1] for i in free)
    constrained = [i for i, p in enumerate(params) if p.structured_outputs is not None]
    stopped = [i for i in constrained if reasons[i] == "stop"]
    return Run(case, wall, generated, generated / wall, free_tokens, free_done,
               free_tokens / free_done, len(constrained), len(stopped),
               sum(_parses(texts[i]) for i in stopped)), times


def _parses(text: str) -> bool:
    try:
        json.loads(text)
    except ValueError:
        return False
    return True


def full_batch_s(times: list[list[float]], tokens: int) -> float:
    """When every request had ``tokens`` tokens: the end of the window in which all of them
    were running."""
    return max(t[tokens - 1] for t in times)


def compile_times(llm: LLM, constraint: StructuredOutputsParams) -> dict[str, float]:
    """The schema's compile in fresh compilers (not the engine's, whose cache the runs use):
    ``cold_s`` the first compile (the grammar engine reads the vocabulary), ``schema_s`` the
    schema alone, after another constraint has made it read the vocabulary."""
    cold = StructuredOutputCompiler(llm.tokenizer, llm.engine.vocab_size)
    start = time.perf_counter()
    cold.compile(constraint)
    cold_s = time.perf_counter() - start
    cold.shutdown()
    primed = StructuredOutputCompiler(llm.tokenizer, llm.engine.vocab_size)
    primed.compile(StructuredOutputsParams(choice=["yes", "no"]))
    start = time.perf_counter()
    primed.compile(constraint)
    schema_s = time.perf_counter() - start
    primed.shutdown()
    return {"cold_s": cold_s, "schema_s": schema_s}


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n", 1)[0])
    parser.add_argument("--quick", action="store_true", help="a small workload, for CI")
    parser.add_argument("--repeat", type=int, default=3, help="interleaved rounds (default 3)")
    parser.add_argument("--dtype", default="float32", help="the engine's dtype")
    parser.add_argument("--out", type=Path, default=DEFAULT_OUT,
                        help=f"where to write the JSON result (default: {DEFAULT_OUT})")
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    spec = QUICK if args.quick else FULL
    schema = record_schema(spec)
    # Compact JSON: with free whitespace the model may indent without end, and its outputs'
    # lengths (so the tail of narrow steps) would vary far more.
    constraint = StructuredOutputsParams(json=schema, disable_any_whitespace=True)
    isa = sorted(f for f in cpu_flags() if "avx" in f or "amx" in f)
    print(f"ISA: {' '.join(isa) or 'unknown'}; torch threads {torch.get_num_threads()}",
          flush=True)
    loaded = load_model()
    prompts = chat_prompts(loaded.tokenizer, messages(spec))
    llm = LLM(loaded=loaded, dtype=args.dtype, kv_cache_bytes=2**29,
              max_num_seqs=spec.requests)
    compiled = compile_times(llm, constraint)
    print(f"compile: {compiled['cold_s']:.3f} s cold, {compiled['schema_s']:.3f} s the schema "
          "alone", flush=True)
    params = {case: case_params(spec, constraint, case) for case in CASES}
    # Warm-up: first steps, and the schema compiled into the engine's cache.
    warm = max(2, spec.requests // 8)
    run(llm, "warm", prompts[:warm], params["half"][:warm])
    monitor = ContentionMonitor()
    runs: dict[str, list[Run]] = {case: [] for case in CASES}
    windows: list[dict[str, float]] = []
    for round_ in range(args.repeat):
        # Alternating the order cancels a drift in the machine's speed over the rounds.
        order = CASES if round_ % 2 == 0 else CASES[::-1]
        times: dict[str, list[list[float]]] = {}
        for case in order:
            measured, times[case] = run(llm, case, prompts, params[case])
            runs[case].append(measured)
            print(f"round {round_ + 1} {case:4s} {measured.tokens_per_s:7.1f} tok/s "
                  f"({measured.generated_tokens} tokens in {measured.wall_s:.1f} s); free "
                  f"requests {measured.free_tokens_per_s:6.1f} tok/s", flush=True)
        shortest = min(len(t) for t, p in zip(times["half"], params["half"])
                       if p.structured_outputs is not None)
        free_s, half_s = (full_batch_s(times[case], shortest) for case in CASES)
        windows.append({"tokens": shortest, "free_s": free_s, "half_s": half_s,
                        "half_over_free": free_s / half_s})
    contention = monitor.stop()
    median = {case: statistics.median(r.tokens_per_s for r in rs) for case, rs in runs.items()}
    free_median = {case: statistics.median(r.free_tokens_per_s for r in rs)
                   for case, rs in runs.items()}
    total_ratio = median["half"] / median["free"]
    free_ratio = free_median["half"] / free_median["free"]
    window_ratio = statistics.median(w["half_over_free"] for w in windows)
    outputs = {key: sum(getattr(r, key) for r in runs["half"])
               for key in ("constrained", "stopped", "parsed")}
    print()
    print("=" * 76)
    print(f"{spec.requests} requests, {spec.requests // 2} constrained in half, "
          f"{spec.output_len} tokens at most, temperature {TEMPERATURE}, {args.dtype}; "
          f"ISA {' '.join(isa)}")
    print(f"free           {median['free']:8.1f} tok/s")
    print(f"half           {median['half']:8.1f} tok/s  {total_ratio:6.1%} of free  "
          "(target >= 90%)")
    print(f"free requests  {free_median['half']:8.1f} tok/s in half, "
          f"{free_median['free']:.1f} in free: {free_ratio:6.1%}  (target >= 98%)")
    print(f"full batch     {window_ratio:6.1%} of free's step rate over each round's first "
          f"{', '.join(str(w['tokens']) for w in windows)} tokens")
    print(f"outputs        {outputs['stopped']} of {outputs['constrained']} constrained ended "
          f"with their grammar, {outputs['parsed']} of them parse as JSON")
    print(f"compile        {compiled['cold_s']:.3f} s cold, {compiled['schema_s']:.3f} s the "
          "schema alone (cached in the engine before timing)")
    if contention.others_fraction_of_machine is not None:
        print(f"others         {contention.others_fraction_of_machine:6.1%} of the CPU taken "
              "by other processes during the runs")
    print("=" * 76)
    result = {
        "benchmark": "structured", "timestamp": datetime.now(UTC).isoformat(),
        "quick": args.quick, "spec": asdict(spec), "dtype": args.dtype, "isa": isa,
        "temperature": TEMPERATURE, "schema": schema,
        "runs": {case: [asdict(r) for r in rs] for case, rs in runs.items()},
        "median_tokens_per_s": median, "median_free_requests_tokens_per_s": free_median,
        "half_over_free": total_ratio, "free_requests_half_over_free": free_ratio,
        "full_batch": windows, "full_batch_half_over_free": window_ratio,
        "outputs": outputs, "compile": compiled, "contention": asdict(contention),
        "git": git_state(), "torch": torch.__version__, "torch_threads": torch.get_num_threads(),
    }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=2) + "\n")
    print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
