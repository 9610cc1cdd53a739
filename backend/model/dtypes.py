"""The dtype a model runs in when the configuration says ``auto``: the faster one on this device.

On CPUs the choice follows what ``bench/throughput.py --dtype`` measured (docs/benchmarks.md):
where the CPU has no bf16 arithmetic (AVX2, plain AVX-512) bf16 weights are converted to fp32
inside every GEMM and run slower than fp32, so fp32 is chosen; bf16 where the CPU multiplies
bf16 natively (``avx512_bf16``, AMX). On CUDA, bf16 where the GPU supports it, else fp16.
``$PAGEDSERVE_AUTO_DTYPE`` overrides the choice (to pin a fleet of mixed machines, or tests
that compare with fp32 references).
"""

from __future__ import annotations

import os
from pathlib import Path

import torch

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}
AUTO_ENV = "PAGEDSERVE_AUTO_DTYPE"
# CPU flags (as /proc/cpuinfo spells them) of native bf16 arithmetic.
BF16_CPU_FLAGS = frozenset({"avx512_bf16", "amx_bf16"})


def cpu_flags() -> frozenset[str]:
    """The feature flags of this machine's CPU (empty where /proc/cpuinfo is missing)."""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("flags"):
                return frozenset(line.split(":", 1)[1].split())
    except OSError:
        pass
    return frozenset()


def auto_dtype(device: str) -> str:
    """The dtype ``auto`` means on ``device`` (one of :data:`DTYPES`)."""
    override = os.environ.get(AUTO_ENV)
    if override:
        if override not in DTYPES:
            raise ValueError(f"{AUTO_ENV} must be one of {sorted(DTYPES)}, got {override!r}")
        return override
    if device.startswith("cuda"):
        return "bfloat16" if torch.cuda.is_bf16_supported() else "float16"
    return "bfloat16" if BF16_CPU_FLAGS & cpu_flags() else "float32"
