"""The host's instruction sets that decide which kernel path is fastest (VNNI and BF16 dot
products, AMX tiles), as the benchmarks print them beside their figures."""

from __future__ import annotations

from pagedserve.model.dtypes import cpu_flags

ISA_FLAGS = ("avx2", "avx512f", "avx512_vnni", "avx_vnni", "avx512_bf16", "amx_bf16", "amx_int8")


def host_isa() -> list[str]:
    """The flags of :data:`ISA_FLAGS` this CPU has, in that order."""
    flags = cpu_flags()
    return [flag for flag in ISA_FLAGS if flag in flags]
