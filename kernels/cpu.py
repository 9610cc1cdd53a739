"""Kernels for CPUs written in C (``kernels/csrc``), built on first use with the machine's compiler.

Torch ops cannot read a paged KV cache in place: decode attention has to gather every sequence's
context into a contiguous copy first, which triples its memory traffic. ``csrc/`` holds the
kernels that read the cache where it lies. They are compiled once per source, compiler and CPU
(``-march=native``) into ``$XDG_CACHE_HOME/pagedserve/kernels`` (about a second) and loaded with
``ctypes``, which releases the GIL while a kernel runs. They run on torch's own OpenMP runtime.

Without a C compiler, or with ``PAGEDSERVE_CPU_KERNELS=0``, :func:`available` is false and the
callers keep their torch implementations, which are also the kernels' test references.
"""

from __future__ import annotations

import ctypes
import functools
import hashlib
import os
import shutil
import subprocess
import tempfile
import warnings
from pathlib import Path

import torch

_SOURCE = Path(__file__).resolve().parent / "csrc" / "paged_attention_cpu.c"
# Compiled with fast math (vectorised expf from glibc's libmvec, reassociated sums) but linked
# without it: linking with -ffast-math adds crtfastmath.o, which would switch the whole process
# to flush-to-zero on load and change torch's own numerics.
_COMPILE_FLAGS = ["-O3", "-march=native", "-ffast-math", "-fopenmp", "-fPIC", "-std=c11"]
_LINK_FLAGS = ["-shared", "-fopenmp", "-lm"]


def _cpu_signature() -> str:
    try:
        text = Path("/proc/cpuinfo").read_text()
    except OSError:
        return os.uname().machine
    lines = [line for line in text.splitlines() if line.startswith(("model name", "flags"))]
    return "\n".join(sorted(set(lines)))


def _cache_dir() -> Path:
    base = os.environ.get("XDG_CACHE_HOME") or str(Path.home() / ".cache")
    return Path(base) / "pagedserve" / "kernels"


def _build(compiler: str, target: Path) -> None:
    target.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=target.parent) as tmp:
        obj = Path(tmp) / "kernel.o"
        lib = Path(tmp) / "kernel.so"
        subprocess.run([compiler, *_COMPILE_FLAGS, "-c", str(_SOURCE), "-o", str(obj)],
                       check=True, capture_output=True, text=True)
        subprocess.run([compiler, str(obj), "-o", str(lib), *_LINK_FLAGS],
                       check=True, capture_output=True, text=True)
        # Atomic: concurrent processes (test servers) may build the same library at once.
        os.replace(lib, target)


@functools.cache
def _library() -> ctypes.CDLL | None:
    if os.environ.get("PAGEDSERVE_CPU_KERNELS", "1") == "0":
        return None
    compiler = os.environ.get("CC") or shutil.which("cc") or shutil.which("gcc")
    if compiler is None:
        return None
    key = hashlib.sha256("\0".join(
        [_SOURCE.read_text(), compiler, *_COMPILE_FLAGS, *_LINK_FLAGS, _cpu_signature()]
    ).encode()).hexdigest()[:16]
    target = _cache_dir() / f"{_SOURCE.stem}-{key}.so"
    if not target.exists():
        try:
            _build(compiler, target)
        except (OSError, subprocess.CalledProcessError) as exc:
            detail = getattr(exc, "stderr", "") or str(exc)
            warnings.warn(f"CPU kernels could not be built, using torch ops instead: {detail}",
                          RuntimeWarning, stacklevel=2)
            return None
    lib = ctypes.CDLL(str(target))
    fn = lib.paged_decode_attention_f32
    i64, ptr = ctypes.c_int64, ctypes.c_void_p
    fn.argtypes = [ptr, i64, ptr, ptr, ptr, i64, ptr, ptr, i64,
                   i64, i64, i64, i64, i64, ctypes.c_float, ctypes.c_int]
    fn.restype = ctypes.c_int
    return lib


def available() -> bool:
    """Whether the C kernels are built and loaded on this machine."""
    return _library() is not None


def decode_attention(q: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor,
                     block_tables: torch.Tensor, seq_lens: torch.Tensor, scale: float,
                     out: torch.Tensor) -> None:
    """Writes into ``out`` the attention of one query token per sequence over its paged context.

    ``q``/``out`` ``[num_seqs, num_heads, head_dim]`` fp32 (rows may be strided);
    ``k_cache``/``v_cache`` ``[num_blocks, block_size, num_kv_heads, head_dim]`` contiguous;
    ``block_tables`` ``[num_seqs, width]`` and ``seq_lens`` ``[num_seqs]`` int64, every length
    at least 1. Only call when :func:`available`.
    """
    lib = _library()
    assert lib is not None, "CPU kernels are not available"
    num_seqs, num_heads, head_dim = q.shape
    _, block_size, num_kv_heads, _ = k_cache.shape
    for t in (q, out):
        if t.dtype != torch.float32 or t.stride(2) != 1 or t.stride(1) != head_dim:
            raise ValueError("q and out must be fp32 with contiguous heads")
    if not (k_cache.is_contiguous() and v_cache.is_contiguous()):
        raise ValueError("the KV cache must be contiguous")
    if block_tables.stride(1) != 1 or not seq_lens.is_contiguous():
        raise ValueError("block_tables rows and seq_lens must be contiguous")
    if block_tables.dtype != torch.int64 or seq_lens.dtype != torch.int64:
        raise ValueError("block_tables and seq_lens must be int64")
    failed = lib.paged_decode_attention_f32(
        q.data_ptr(), q.stride(0), k_cache.data_ptr(), v_cache.data_ptr(),
        block_tables.data_ptr(), block_tables.stride(0), seq_lens.data_ptr(),
        out.data_ptr(), out.stride(0), num_seqs, num_heads, num_kv_heads, head_dim,
        block_size, scale, torch.get_num_threads())
    if failed:
        raise MemoryError("decode attention could not allocate its scratch memory")
