"""Kernels for CPUs written in C (``kernels/csrc``), built on first use with the machine's compiler.

Torch ops cannot read a paged KV cache in place: decode attention has to gather every sequence's
context into a contiguous copy first, which triples its memory traffic. And each torch op is a
pass over the step's activations: RMSNorm takes six, rotary embedding and the KV write eight.
``csrc/`` holds kernels that read the cache where it lies and make one pass per row. They are
compiled (about a second) once per source, compiler and CPU (``-march=native``) into
``$PAGEDSERVE_CACHE/kernels`` (default ``~/.cache/pagedserve/kernels``) and loaded with
``ctypes``, which releases the GIL while a kernel runs. Built by gcc, they run on torch's own
OpenMP runtime (the same ``libgomp.so.1``).

Each kernel comes in fp32, bf16 and fp16 (:data:`DTYPES`): it computes in fp32 and rounds where
torch's reference rounds, so every dtype the engine serves runs on the kernels. The products
with llama.cpp's block formats (:func:`block_matmul`) and the fused decode layers built on them
(:func:`decode_layers`) take fp32 activations.

Without a C compiler, or with ``PAGEDSERVE_CPU_KERNELS=0``, :func:`available` is false and the
callers keep their torch implementations, which are also the kernels' test references.
"""

from __future__ import annotations

import ctypes
import functools
import hashlib
import os
import shutil
import stat
import subprocess
import tempfile
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

CSRC = Path(__file__).resolve().parent / "csrc"
COMMON_FLAGS = ["-O3", "-march=native", "-fopenmp", "-fPIC", "-std=c11"]
# Each source with its floating-point contract. Attention is compiled with fast math for its
# vectorised expf (glibc's libmvec), but without reassociation or FMA contraction: its sums are
# taken in the order written, so each cache type's copy of the tiles rounds as the fp32 one does
# and a 16-bit cache reads exactly as its fp32 widening (GCC had contracted and reassociated copy
# by copy). The row-wise kernels round every operation as
# torch does (no fast math, no FMA contraction). The library is linked without fast math:
# linking with -ffast-math adds crtfastmath.o, which would switch the whole process to
# flush-to-zero on load and change torch's own numerics.
SOURCE_FLAGS = {
    "paged_attention_cpu.c": ["-ffast-math", "-fno-associative-math", "-ffp-contract=off"],
    "elementwise_cpu.c": ["-fno-math-errno", "-ffp-contract=off"],
    "block_quant_cpu.c": ["-fno-math-errno"],
    "decode_layers_cpu.c": ["-fno-math-errno", "-ffp-contract=off"],
    # The quantized paths' activation: vectorised expf (libmvec), as attention's.
    "activation_cpu.c": ["-ffast-math"],
    # The sampler's argmax and log-normalizer: vectorised expf too.
    "sampling_cpu.c": ["-ffast-math"],
    # The LoRA products sum in another order than torch's matmuls anyway: FMAs allowed.
    "lora_cpu.c": ["-fno-math-errno", "-ffp-contract=fast"],
}
_LINK_FLAGS = ["-shared", "-fopenmp", "-lm"]
_LIBRARY_NAME = "pagedserve_cpu"
# The element types the kernels take, and the suffix of each one's C functions.
DTYPES = {torch.float32: "f32", torch.bfloat16: "bf16", torch.float16: "f16"}
# The KV cache types the cache kernels (rotary write, decode attention) take beside each
# activation type: the same type, or a 16-bit cache under fp32 activations (half the bytes
# attention reads).
CACHE_DTYPES = {torch.float32: (torch.float32, torch.bfloat16, torch.float16),
                torch.bfloat16: (torch.bfloat16,), torch.float16: (torch.float16,)}
# The cache types' codes in decode_layers_q (kernels/csrc/decode_layers_cpu.c).
CACHE_TYPES = {torch.float32: 0, torch.bfloat16: 1, torch.float16: 2}


def _cpu_signature() -> str:
    try:
        text = Path("/proc/cpuinfo").read_text()
    except OSError:
        return os.uname().machine
    lines = [line for line in text.splitlines() if line.startswith(("model name", "flags"))]
    return "\n".join(sorted(set(lines)))


def _cache_dir() -> Path:
    # The same root as the converted models of pagedserve.model.loader.
    root = os.environ.get("PAGEDSERVE_CACHE") or str(Path.home() / ".cache" / "pagedserve")
    return Path(root) / "kernels"


def _build(compiler: str, target: Path) -> None:
    target.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=target.parent) as tmp:
        # The sources compile at once, on as many cores as there are: a first start waits for
        # the slowest one, not for their sum.
        objects = {name: Path(tmp) / f"{name}.o" for name in SOURCE_FLAGS}
        compiles = [subprocess.Popen([compiler, *COMMON_FLAGS, *flags, "-c", str(CSRC / name),
                                      "-o", str(objects[name])],
                                     stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
                    for name, flags in SOURCE_FLAGS.items()]
        for compile_ in compiles:
            out, err = compile_.communicate()
            if compile_.returncode != 0:
                raise subprocess.CalledProcessError(compile_.returncode, compile_.args, out, err)
        lib = Path(tmp) / "kernels.so"
        subprocess.run([compiler, *map(str, objects.values()), "-o", str(lib), *_LINK_FLAGS],
                       check=True, capture_output=True, text=True)
        # Atomic: concurrent processes (test servers) may build the same library at once.
        os.replace(lib, target)


def _claim_private(folder: Path) -> None:
    """Makes ``folder`` (in a shared temporary directory) ours alone, or raises ``OSError``.

    Whoever can write there could plant a library under the predictable name we load.
    """
    folder.mkdir(mode=0o700, exist_ok=True)
    info = folder.lstat()
    if not stat.S_ISDIR(info.st_mode) or info.st_uid != os.getuid() or info.st_mode & 0o077:
        raise OSError(f"{folder} is not a private folder of this user")


def _declare(lib: ctypes.CDLL) -> None:
    i64, ptr, f32, nt = ctypes.c_int64, ctypes.c_void_p, ctypes.c_float, ctypes.c_int
    cache_signatures = {
        "paged_decode_attention": ([ptr, i64, ptr, ptr, i64, ptr, i64, i64, ptr, ptr, i64,
                                    i64, i64, i64, i64, i64, f32, i64, ptr, nt], ctypes.c_int),
        "rotary_write_kv": ([ptr, i64, ptr, ptr, ptr, ptr, i64, ptr, i64, i64, i64, i64, ptr,
                             ptr, f32, nt], ctypes.c_int),
    }
    for name, (args, result) in cache_signatures.items():
        for dtype, cache_dtypes in CACHE_DTYPES.items():
            for cache_dtype in cache_dtypes:
                fn = getattr(lib, f"{name}_{DTYPES[dtype]}_{DTYPES[cache_dtype]}")
                fn.argtypes = args
                fn.restype = result
    signatures = {
        "add_rms_norm": ([ptr, i64, ptr, i64, ptr, ptr, i64, i64, i64, f32, nt], None),
        "add_layer_norm": ([ptr, i64, ptr, i64, ptr, ptr, ptr, i64, i64, i64, f32, nt], None),
        "add_lora": ([ptr, i64, ptr, i64, ptr, ptr, ptr, i64, i64, i64, i64, i64, ptr, i64, nt],
                     ctypes.c_int),
    }
    for name, (args, typed_result) in signatures.items():
        for suffix in DTYPES.values():
            fn = getattr(lib, f"{name}_{suffix}")
            fn.argtypes = args
            fn.restype = typed_result
    # fp32 only: the block-quantized products, their activation, the sampler's reductions.
    untyped = {
        "quantize_rows_q8": [ptr, i64, ptr, i64, i64, nt],
        "matmul_q4_1": [ptr, i64, ptr, i64, i64, ptr, i64, nt],
        "matmul_q8_0": [ptr, i64, ptr, i64, i64, ptr, i64, nt],
        "matmul_q4_1x8": [ptr, i64, ptr, i64, i64, ptr, i64, nt],
        "matmul_q8_0x8": [ptr, i64, ptr, i64, i64, ptr, i64, nt],
        "silu_mul": [ptr, i64, i64, ptr, ptr, ptr, nt],
        "argmax_logsumexp": [ptr, i64, i64, i64, ptr, ptr, nt],
    }
    for name, args in untyped.items():
        fn = getattr(lib, name)
        fn.argtypes = args
        fn.restype = None
    lib.decode_layers_q.argtypes = [ctypes.POINTER(DecodeLayer), i64, ptr, ptr, i64, i64, i64,
                                    i64, i64, i64, ptr, ptr, ptr, i64, i64, ptr, i64, i64, ptr,
                                    i64, f32, f32, nt]
    lib.decode_layers_q.restype = ctypes.c_int


def _kernel(name: str, dtype: torch.dtype) -> Any:
    """The C function ``name`` for elements of ``dtype``."""
    lib = _library()
    assert lib is not None, "CPU kernels are not available"
    return getattr(lib, f"{name}_{DTYPES[dtype]}")


def _cache_kernel(name: str, dtype: torch.dtype, cache_dtype: torch.dtype) -> Any:
    """The C function ``name`` for activations of ``dtype`` over a cache of ``cache_dtype``."""
    lib = _library()
    assert lib is not None, "CPU kernels are not available"
    return getattr(lib, f"{name}_{DTYPES[dtype]}_{DTYPES[cache_dtype]}")


def takes_cache(dtype: torch.dtype, cache_dtype: torch.dtype) -> bool:
    """Whether the cache kernels take activations of ``dtype`` over a cache of
    ``cache_dtype`` (:data:`CACHE_DTYPES`)."""
    return cache_dtype in CACHE_DTYPES.get(dtype, ())


def _check_cache(k_cache: torch.Tensor, v_cache: torch.Tensor, dtype: torch.dtype) -> None:
    if not (k_cache.is_contiguous() and v_cache.is_contiguous()) or \
            k_cache.dtype != v_cache.dtype or not takes_cache(dtype, k_cache.dtype):
        allowed = ", ".join(str(t) for t in CACHE_DTYPES[dtype])
        raise ValueError(f"the K and V caches must be contiguous, of one dtype among {allowed} "
                         f"beside {dtype} activations; got {k_cache.dtype} and {v_cache.dtype}")


def compiler() -> str | None:
    """The C compiler the kernels are built with: ``$CC``, else ``cc`` or ``gcc``."""
    return os.environ.get("CC") or shutil.which("cc") or shutil.which("gcc")


@functools.cache
def _library() -> ctypes.CDLL | None:
    if os.environ.get("PAGEDSERVE_CPU_KERNELS", "1") == "0":
        return None
    compiler_ = compiler()
    if compiler_ is None:
        return None
    parts = [compiler_, *COMMON_FLAGS, *_LINK_FLAGS, _cpu_signature()]
    for name, flags in SOURCE_FLAGS.items():
        parts += [name, (CSRC / name).read_text(encoding="utf-8"), *flags]
    for header in sorted(CSRC.glob("*.h")):
        parts += [header.name, header.read_text(encoding="utf-8")]
    key = hashlib.sha256("\0".join(parts).encode()).hexdigest()[:16]
    name = f"{_LIBRARY_NAME}-{key}.so"
    # The user's cache first; a private temporary folder where that is not writable.
    places = [_cache_dir(), Path(tempfile.gettempdir()) / f"pagedserve-kernels-{os.getuid()}"]
    problem = ""
    for place in places:
        target = place / name
        try:
            if place != places[0]:
                _claim_private(place)
            if not target.exists():
                _build(compiler_, target)
            lib = ctypes.CDLL(str(target))
        except (OSError, subprocess.CalledProcessError) as exc:
            problem = getattr(exc, "stderr", "") or str(exc)
            continue
        _declare(lib)
        return lib
    warnings.warn(f"CPU kernels could not be built, using torch ops instead: {problem}",
                  RuntimeWarning, stacklevel=2)
    return None


def available() -> bool:
    """Whether the C kernels are built and loaded on this machine."""
    return _library() is not None


def decode_attention(q: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor,
                     block_tables: torch.Tensor, seq_lens: torch.Tensor, scale: float,
                     out: torch.Tensor, sliding_window: int | None = None,
                     alibi_slopes: torch.Tensor | None = None) -> None:
    """Writes into ``out`` the attention of one query token per sequence over its paged context.

    ``q``/``out`` ``[num_seqs, num_heads, head_dim]`` (rows may be strided);
    ``k_cache``/``v_cache`` ``[num_blocks, block_size, num_kv_heads, head_dim]`` contiguous, of
    q's dtype (one of :data:`DTYPES`) or another it takes (:data:`CACHE_DTYPES`);
    ``block_tables`` ``[num_seqs, width]`` and ``seq_lens`` ``[num_seqs]`` int64, every length
    at least 1. With ``sliding_window`` each query attends over its last ``sliding_window``
    tokens only; ``alibi_slopes`` (fp32, one per query head) adds ``slope * (key position -
    query position)`` to the scaled scores. Only call when :func:`available`.
    """
    num_seqs, num_heads, head_dim = q.shape
    num_blocks, block_size, num_kv_heads, cache_head_dim = k_cache.shape
    if out.shape != q.shape or v_cache.shape != k_cache.shape or cache_head_dim != head_dim \
            or num_heads % num_kv_heads:
        raise ValueError(f"shapes do not agree: q {tuple(q.shape)}, out {tuple(out.shape)}, "
                         f"k/v cache {tuple(k_cache.shape)} / {tuple(v_cache.shape)}")
    if block_tables.dim() != 2 or block_tables.shape[0] != num_seqs or \
            seq_lens.shape != (num_seqs,):
        raise ValueError("block_tables and seq_lens need one row per query")
    _check_cpu(q, k_cache, v_cache, block_tables, seq_lens, out)
    dtype = _supported_dtype(q.dtype)
    for t in (q, out):
        if t.dtype != dtype or t.stride(2) != 1 or t.stride(1) != head_dim or \
                (num_seqs > 1 and t.stride(0) < num_heads * head_dim):
            raise ValueError(f"q and out must be {dtype} with contiguous heads, rows apart")
    _check_cache(k_cache, v_cache, dtype)
    if block_tables.stride(1) != 1 or not seq_lens.is_contiguous():
        raise ValueError("block_tables rows and seq_lens must be contiguous")
    if block_tables.dtype != torch.int64 or seq_lens.dtype != torch.int64:
        raise ValueError("block_tables and seq_lens must be int64")
    if sliding_window is not None and sliding_window < 1:
        raise ValueError(f"sliding_window must be positive, got {sliding_window}")
    if alibi_slopes is not None:
        _check_cpu(alibi_slopes)
        if alibi_slopes.dtype != torch.float32 or alibi_slopes.shape != (num_heads,) or \
                not alibi_slopes.is_contiguous():
            raise ValueError("alibi_slopes must be a contiguous fp32 vector, one per head")
    status = _cache_kernel("paged_decode_attention", dtype, k_cache.dtype)(
        q.data_ptr(), q.stride(0), k_cache.data_ptr(), v_cache.data_ptr(), num_blocks,
        block_tables.data_ptr(), block_tables.shape[1], block_tables.stride(0),
        seq_lens.data_ptr(),
        out.data_ptr(), out.stride(0), num_seqs, num_heads, num_kv_heads, head_dim,
        block_size, scale, sliding_window or 0,
        None if alibi_slopes is None else alibi_slopes.data_ptr(), torch.get_num_threads())
    if status == 2:
        raise ValueError("a sequence length exceeds its block table, or the table names a "
                         "block outside the cache")
    if status:
        raise MemoryError("decode attention could not allocate its scratch memory")


def _supported_dtype(dtype: torch.dtype) -> torch.dtype:
    if dtype not in DTYPES:
        raise ValueError(f"the CPU kernels take fp32, bf16 or fp16 tensors, got {dtype}")
    return dtype


def _check_cpu(*tensors: torch.Tensor) -> None:
    # The kernels take data pointers as host memory: anything else must not reach them.
    for t in tensors:
        if t.device.type != "cpu":
            raise ValueError(f"the CPU kernels take CPU tensors, got one on {t.device}")


def _check_rows(name: str, t: torch.Tensor, dtype: torch.dtype) -> None:
    if t.dtype != dtype or t.dim() != 2 or t.stride(1) != 1 or \
            (t.shape[0] > 1 and t.stride(0) < t.shape[1]):
        raise ValueError(f"{name} must be a 2-d {dtype} tensor with contiguous, separate rows")


def _check_vector(name: str, t: torch.Tensor, dtype: torch.dtype, size: int) -> None:
    if t.dtype != dtype or t.shape != (size,) or t.stride(0) != 1:
        raise ValueError(f"{name} must be a contiguous {dtype} vector of {size} elements")


def _check_norm_rows(x: torch.Tensor, residual: torch.Tensor | None) -> torch.dtype:
    dtype = _supported_dtype(x.dtype)
    _check_rows("x", x, dtype)
    if residual is not None:
        _check_rows("residual", residual, dtype)
        if residual.shape != x.shape:
            raise ValueError(f"residual {tuple(residual.shape)} does not match x "
                             f"{tuple(x.shape)}")
        _check_cpu(residual)
    _check_cpu(x)
    return dtype


def add_rms_norm(x: torch.Tensor, residual: torch.Tensor | None, weight: torch.Tensor,
                 eps: float) -> torch.Tensor:
    """RMSNorm of the rows of ``x`` ``[rows, dim]``, after ``x += residual`` when given.

    ``x`` is updated in place (it is the residual stream); returns the normalised rows.
    """
    dtype = _check_norm_rows(x, residual)
    _check_vector("weight", weight, dtype, x.shape[1])
    _check_cpu(weight)
    out = torch.empty(x.shape, dtype=x.dtype, device=x.device)
    _kernel("add_rms_norm", dtype)(
        x.data_ptr(), x.stride(0), None if residual is None else residual.data_ptr(),
        0 if residual is None else residual.stride(0), weight.data_ptr(), out.data_ptr(),
        out.stride(0), x.shape[0], x.shape[1], eps, torch.get_num_threads())
    return out


def add_layer_norm(x: torch.Tensor, residual: torch.Tensor | None, weight: torch.Tensor,
                   bias: torch.Tensor | None, eps: float) -> torch.Tensor:
    """LayerNorm of the rows of ``x`` ``[rows, dim]``, after ``x += residual`` when given.

    ``x`` is updated in place (it is the residual stream); returns the normalised rows.
    """
    dtype = _check_norm_rows(x, residual)
    _check_vector("weight", weight, dtype, x.shape[1])
    _check_cpu(weight)
    if bias is not None:
        _check_vector("bias", bias, dtype, x.shape[1])
        _check_cpu(bias)
    out = torch.empty(x.shape, dtype=x.dtype, device=x.device)
    _kernel("add_layer_norm", dtype)(
        x.data_ptr(), x.stride(0), None if residual is None else residual.data_ptr(),
        0 if residual is None else residual.stride(0), weight.data_ptr(),
        None if bias is None else bias.data_ptr(), out.data_ptr(), out.stride(0), x.shape[0],
        x.shape[1], eps, torch.get_num_threads())
    return out


def rotary_write_kv(qkv: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor,
                    k_cache: torch.Tensor, v_cache: torch.Tensor, slot_mapping: torch.Tensor,
                    num_heads: int, num_kv_heads: int, q_norm: torch.Tensor | None = None,
                    k_norm: torch.Tensor | None = None, norm_eps: float = 0.0) -> None:
    """Rotates the q and k heads of the fused ``qkv`` rows in place and stores k and v.

    ``qkv`` ``[tokens, (num_heads + 2 * num_kv_heads) * head_dim]``; ``cos``/``sin``
    ``[tokens, head_dim]`` contiguous; caches ``[num_blocks, block_size, num_kv_heads,
    head_dim]`` contiguous; ``slot_mapping`` ``[tokens]`` int64; the other floating tensors of
    qkv's dtype, the caches of it or another the kernels take (:data:`CACHE_DTYPES`: the keys
    and values are rounded to it). ``q_norm``/``k_norm`` (``[head_dim]``): each q / k head is
    RMS-normalised with these weights before its rotation.
    """
    dtype = _supported_dtype(qkv.dtype)
    _check_rows("qkv", qkv, dtype)
    head_dim = k_cache.shape[-1]
    tokens = qkv.shape[0]
    _check_cpu(qkv, cos, sin, k_cache, v_cache, slot_mapping)
    if k_cache.dim() != 4 or qkv.shape[1] != (num_heads + 2 * num_kv_heads) * head_dim or \
            k_cache.shape[2] != num_kv_heads or head_dim % 2:
        raise ValueError("qkv, the head counts and the cache do not agree")
    for name, t in (("cos", cos), ("sin", sin)):
        if t.dtype != dtype or not t.is_contiguous() or t.shape != (tokens, head_dim):
            raise ValueError(f"{name} must be a contiguous {dtype} [tokens, head_dim] table")
    _check_cache(k_cache, v_cache, dtype)
    if slot_mapping.dtype != torch.int64 or not slot_mapping.is_contiguous() or \
            slot_mapping.shape != (tokens,):
        raise ValueError("slot_mapping must be a contiguous int64 vector, one slot per token")
    if v_cache.shape != k_cache.shape:
        raise ValueError("the K and V caches must have the same shape")
    for name, norm in (("q_norm", q_norm), ("k_norm", k_norm)):
        if norm is not None:
            _check_vector(name, norm, dtype, head_dim)
            _check_cpu(norm)
    status = _cache_kernel("rotary_write_kv", dtype, k_cache.dtype)(
        qkv.data_ptr(), qkv.stride(0), cos.data_ptr(), sin.data_ptr(), k_cache.data_ptr(),
        v_cache.data_ptr(), k_cache.shape[0] * k_cache.shape[1], slot_mapping.data_ptr(),
        tokens, num_heads, num_kv_heads, head_dim,
        None if q_norm is None else q_norm.data_ptr(),
        None if k_norm is None else k_norm.data_ptr(), norm_eps, torch.get_num_threads())
    if status:
        raise ValueError("slot_mapping names a slot outside the cache")


def add_lora(y: torch.Tensor, x: torch.Tensor, a: torch.Tensor, b: torch.Tensor,
             slots: torch.Tensor, out_slices: tuple[int, ...]) -> None:
    """Adds in place to each row ``t`` of ``y`` with ``slots[t] >= 0`` its adapter's delta, part
    by part of ``out_slices`` (kernels/lora.py defines it; kernels/csrc/lora_cpu.c computes it).

    ``y`` ``[rows, out]`` and ``x`` ``[rows, in]`` with contiguous rows (possibly apart), ``a``
    ``[num_slots, len(out_slices) * rank, in]`` and ``b`` ``[num_slots, out, rank]`` contiguous,
    all four of one dtype of :data:`DTYPES`; ``slots`` ``[rows]`` contiguous int64. Only call
    when :func:`available`.
    """
    dtype = _supported_dtype(y.dtype)
    _check_rows("y", y, dtype)
    _check_rows("x", x, dtype)
    rows, out = y.shape
    in_features = x.shape[1]
    parts = len(out_slices)
    if a.dim() != 3 or b.dim() != 3 or x.shape[0] != rows or min(out_slices, default=0) < 0 \
            or sum(out_slices) != out or b.shape[:2] != (a.shape[0], out) \
            or a.shape[1:] != (parts * b.shape[2], in_features):
        raise ValueError(f"shapes do not agree: y {tuple(y.shape)}, x {tuple(x.shape)}, "
                         f"a {tuple(a.shape)}, b {tuple(b.shape)}, out_slices {out_slices}")
    for name, t in (("a", a), ("b", b)):
        if t.dtype != dtype or not t.is_contiguous():
            raise ValueError(f"{name} must be a contiguous {dtype} tensor, as y")
    _check_vector("slots", slots, torch.int64, rows)
    _check_cpu(y, x, a, b, slots)
    status = _kernel("add_lora", dtype)(
        y.data_ptr(), y.stride(0), x.data_ptr(), x.stride(0), a.data_ptr(), b.data_ptr(),
        slots.data_ptr(), a.shape[0], rows, in_features, out, b.shape[2],
        (ctypes.c_int64 * parts)(*out_slices), parts, torch.get_num_threads())
    if status == 2:
        raise ValueError(f"a slot is outside the {a.shape[0]} adapters of a and b")
    if status:
        raise MemoryError("add_lora could not allocate its scratch memory")


# Bytes of one block of 32 in each weight format of kernels/csrc/block_quant_cpu.c (q4_1x8,
# q8_0x8: Q4_1 and Q8_0 with rows repacked eight at a time, the same bytes in all), and of one
# block of quantized activations (fp32 scale, fp32 and int32 sums, 32 int8 codes).
BLOCK_BYTES = {"q4_1": 20, "q8_0": 34, "q4_1x8": 20, "q8_0x8": 34}
# Output rows of a weight in each format come in multiples of this.
ROW_MULTIPLE = {"q4_1": 1, "q8_0": 1, "q4_1x8": 8, "q8_0x8": 8}
_Q8_BLOCK_BYTES = 44


def block_matmul(x: torch.Tensor, blocks: torch.Tensor, kind: str, out_features: int
                 ) -> torch.Tensor:
    """``x @ w.T`` for fp32 rows ``x`` ``[rows, in]`` and a weight ``w`` ``[out_features, in]``
    given as its blocks of 32 in llama.cpp's format ``kind`` (:data:`BLOCK_BYTES`): ``blocks``
    uint8 ``[out_features, in / 32 * block bytes]``, contiguous. The activations are quantized to
    8 bits per block of 32 first (kernels/csrc/block_quant_cpu.c). Returns fp32 ``[rows, out]``.
    Only call when :func:`available`.
    """
    if kind not in BLOCK_BYTES:
        raise ValueError(f"unknown block format {kind!r}; known: {', '.join(BLOCK_BYTES)}")
    if x.dim() != 2 or x.dtype != torch.float32 or x.stride(1) != 1:
        raise ValueError("x must be fp32 rows [rows, in] with contiguous elements")
    rows, in_features = x.shape
    if in_features % 32 or blocks.dtype != torch.uint8 or not blocks.is_contiguous() or \
            out_features % ROW_MULTIPLE[kind] or \
            blocks.shape != (out_features, in_features // 32 * BLOCK_BYTES[kind]):
        raise ValueError(f"{kind} blocks {tuple(blocks.shape)} do not hold a "
                         f"[{out_features}, {in_features}] weight (inputs in blocks of 32)")
    _check_cpu(x, blocks)
    threads = torch.get_num_threads()
    quantized = torch.empty(rows * (in_features // 32) * _Q8_BLOCK_BYTES, dtype=torch.uint8)
    lib = _library()
    assert lib is not None, "CPU kernels are not available"
    lib.quantize_rows_q8(x.data_ptr(), x.stride(0), quantized.data_ptr(), rows, in_features,
                         threads)
    y = torch.empty(rows, out_features, dtype=torch.float32)
    getattr(lib, f"matmul_{kind}")(quantized.data_ptr(), rows, blocks.data_ptr(), out_features,
                                   in_features, y.data_ptr(), y.stride(0), threads)
    return y


def silu_mul(gate_up: torch.Tensor, gate_bias: torch.Tensor | None,
             up_bias: torch.Tensor | None) -> torch.Tensor:
    """``silu(g + gate_bias) * (u + up_bias)`` for fp32 rows ``gate_up`` ``[rows, 2 * width]``
    holding the gate products ``g`` then the up products ``u`` of each row; ``[rows, width]``.
    Only call when :func:`available`."""
    if gate_up.dim() != 2 or gate_up.dtype != torch.float32 or not gate_up.is_contiguous() or \
            gate_up.shape[1] % 2:
        raise ValueError("gate_up must be contiguous fp32 rows [rows, 2 * width]")
    rows, width = gate_up.shape[0], gate_up.shape[1] // 2
    for name, bias in (("gate_bias", gate_bias), ("up_bias", up_bias)):
        if bias is not None:
            _check_vector(name, bias, torch.float32, width)
            _check_cpu(bias)
    _check_cpu(gate_up)
    out = torch.empty(rows, width, dtype=torch.float32)
    lib = _library()
    assert lib is not None, "CPU kernels are not available"
    lib.silu_mul(gate_up.data_ptr(), rows, width,
                 None if gate_bias is None else gate_bias.data_ptr(),
                 None if up_bias is None else up_bias.data_ptr(), out.data_ptr(),
                 torch.get_num_threads())
    return out


def argmax_logsumexp(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Each row's ``argmax`` (the first among equals) and ``logsumexp`` for fp32 rows ``x``
    ``[rows, vocab]`` with contiguous elements (kernels/csrc/sampling_cpu.c): int64 and fp32
    ``[rows]``. Only call when :func:`available`."""
    if x.dim() != 2 or x.dtype != torch.float32 or x.stride(1) != 1 or x.shape[1] < 1:
        raise ValueError("x must be fp32 rows [rows, vocab] with contiguous elements")
    _check_cpu(x)
    rows = x.shape[0]
    tokens = torch.empty(rows, dtype=torch.int64)
    lse = torch.empty(rows, dtype=torch.float32)
    lib = _library()
    assert lib is not None, "CPU kernels are not available"
    lib.argmax_logsumexp(x.data_ptr(), x.stride(0), rows, x.shape[1], tokens.data_ptr(),
                         lse.data_ptr(), torch.get_num_threads())
    return tokens, lse


class DecodeLayer(ctypes.Structure):
    """One decoder layer for :func:`decode_layers`: the addresses of its fp32 norms and biases
    (0 where absent), of its projections' blocks and their formats (:data:`BLOCK_KINDS`), of its
    KV cache (of the call's ``cache_dtype``), and its sliding window (0: none). The tensors must
    outlive every call that reads the structure. Mirrors ``decode_layer`` of
    kernels/csrc/decode_layers_cpu.c."""

    _fields_ = [(name, ctypes.c_void_p) for name in (
        "input_norm", "post_norm", "qkv", "o", "gate_up", "down")] + \
        [(name, ctypes.c_int64) for name in ("qkv_kind", "o_kind", "gate_up_kind", "down_kind")] + \
        [(name, ctypes.c_void_p) for name in (
            "qkv_bias", "o_bias", "gate_bias", "up_bias", "down_bias", "q_norm", "k_norm",
            "k_cache", "v_cache")] + \
        [("window", ctypes.c_int64)]


# The block formats' codes in DecodeLayer.
BLOCK_KINDS = {"q4_1": 0, "q8_0": 1, "q4_1x8": 2, "q8_0x8": 3}


@dataclass(frozen=True)
class DecodeShape:
    """The sizes every layer of a :func:`decode_layers` call shares."""

    hidden: int
    intermediate: int
    num_heads: int
    num_kv_heads: int
    head_dim: int
    eps: float
    scale: float


def decode_layers(layers: ctypes.Array[DecodeLayer], shape: DecodeShape, h: torch.Tensor,
                  cos: torch.Tensor, sin: torch.Tensor, slot_mapping: torch.Tensor,
                  num_cache_blocks: int, block_size: int, block_tables: torch.Tensor,
                  seq_lens: torch.Tensor, cache_dtype: torch.dtype = torch.float32
                  ) -> torch.Tensor:
    """Runs ``layers`` (kernels/csrc/decode_layers_cpu.c) over one decode token per sequence:
    ``h`` fp32 ``[rows, hidden]`` contiguous (the residual stream, updated in place), ``cos``/
    ``sin`` ``[rows, head_dim]``, ``slot_mapping`` ``[rows]``, ``block_tables`` ``[rows, width]``
    and ``seq_lens`` ``[rows]`` int64, contiguous; ``cache_dtype`` is the layers' KV caches'
    (:data:`CACHE_TYPES`). Returns the last layer's output, to be added
    to ``h`` by the final norm. The caller vouches for the layers' weights and caches (built
    from the model's own); the batch is checked here. Only call when :func:`available`."""
    rows = h.shape[0]
    if h.dtype != torch.float32 or not h.is_contiguous() or h.shape != (rows, shape.hidden):
        raise ValueError(f"h must be contiguous fp32 [rows, {shape.hidden}]")
    for name, t in (("cos", cos), ("sin", sin)):
        if t.dtype != torch.float32 or not t.is_contiguous() or \
                t.shape != (rows, shape.head_dim):
            raise ValueError(f"{name} must be a contiguous fp32 [rows, head_dim] table")
    for name, t in (("slot_mapping", slot_mapping), ("seq_lens", seq_lens)):
        if t.dtype != torch.int64 or not t.is_contiguous() or t.shape != (rows,):
            raise ValueError(f"{name} must be a contiguous int64 vector, one entry per row")
    if block_tables.dtype != torch.int64 or block_tables.dim() != 2 or \
            block_tables.shape[0] != rows or block_tables.stride(1) != 1:
        raise ValueError("block_tables must be int64 [rows, width] with contiguous rows")
    _check_cpu(h, cos, sin, slot_mapping, block_tables, seq_lens)
    delta = torch.empty_like(h)
    lib = _library()
    assert lib is not None, "CPU kernels are not available"
    status = lib.decode_layers_q(
        layers, len(layers), h.data_ptr(), delta.data_ptr(), rows, shape.hidden,
        shape.intermediate, shape.num_heads, shape.num_kv_heads, shape.head_dim, cos.data_ptr(),
        sin.data_ptr(), slot_mapping.data_ptr(), num_cache_blocks, block_size,
        block_tables.data_ptr(), block_tables.shape[1], block_tables.stride(0),
        seq_lens.data_ptr(), CACHE_TYPES[cache_dtype], shape.eps, shape.scale,
        torch.get_num_threads())
    if status == 2:
        raise ValueError("a slot, sequence length or block table lies outside the cache")
    if status:
        raise MemoryError("the decode layers could not allocate their scratch memory")
    return delta
