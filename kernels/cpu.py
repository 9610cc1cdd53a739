"""Kernels for CPUs written in C (``kernels/csrc``), built on first use with the machine's compiler.

Torch ops cannot read a paged KV cache in place: decode attention has to gather every sequence's
context into a contiguous copy first, which triples its memory traffic. And each torch op is a
pass over the step's activations: RMSNorm takes six, rotary embedding and the KV write eight.
``csrc/`` holds kernels that read the cache where it lies and make one pass per row. They are
compiled (about a second) once per source, compiler and CPU (``-march=native``) into
``$PAGEDSERVE_CACHE/kernels`` (default ``~/.cache/pagedserve/kernels``) and loaded with
``ctypes``, which releases the GIL while a kernel runs. Built by gcc, they run on torch's own
OpenMP runtime (the same ``libgomp.so.1``).

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
from pathlib import Path

import torch

_CSRC = Path(__file__).resolve().parent / "csrc"
_COMMON_FLAGS = ["-O3", "-march=native", "-fopenmp", "-fPIC", "-std=c11"]
# Each source with its floating-point contract. Attention is compiled with fast math (vectorised
# expf from glibc's libmvec, reassociated sums). The row-wise kernels round every operation as
# torch does (no fast math, no FMA contraction). The library is linked without fast math:
# linking with -ffast-math adds crtfastmath.o, which would switch the whole process to
# flush-to-zero on load and change torch's own numerics.
_SOURCES = {
    "paged_attention_cpu.c": ["-ffast-math"],
    "elementwise_cpu.c": ["-fno-math-errno", "-ffp-contract=off"],
}
_LINK_FLAGS = ["-shared", "-fopenmp", "-lm"]
_LIBRARY_NAME = "pagedserve_cpu"


def _cpu_signature() -> str:
    try:
        text = Path("/proc/cpuinfo").read_text()
    except OSError:
        return os.uname().machine
    lines = [line for line in text.splitlines() if line.startswith(("model name", "flags"))]
    return "\n".join(sorted(set(lines)))


def _cache_dir() -> Path:
    # The same root as the converted models of backend.model.loader.
    root = os.environ.get("PAGEDSERVE_CACHE") or str(Path.home() / ".cache" / "pagedserve")
    return Path(root) / "kernels"


def _build(compiler: str, target: Path) -> None:
    target.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=target.parent) as tmp:
        objects = []
        for name, flags in _SOURCES.items():
            obj = Path(tmp) / f"{name}.o"
            subprocess.run([compiler, *_COMMON_FLAGS, *flags, "-c", str(_CSRC / name), "-o",
                            str(obj)], check=True, capture_output=True, text=True)
            objects.append(str(obj))
        lib = Path(tmp) / "kernels.so"
        subprocess.run([compiler, *objects, "-o", str(lib), *_LINK_FLAGS],
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
    signatures = {
        "paged_decode_attention_f32": ([ptr, i64, ptr, ptr, i64, ptr, i64, i64, ptr, ptr, i64,
                                        i64, i64, i64, i64, i64, f32, nt], ctypes.c_int),
        "add_rms_norm_f32": ([ptr, i64, ptr, i64, ptr, ptr, i64, i64, i64, f32, nt], None),
        "rotary_write_kv_f32": ([ptr, i64, ptr, ptr, ptr, ptr, i64, ptr, i64, i64, i64, i64,
                                 nt], ctypes.c_int),
    }
    for name, (args, result) in signatures.items():
        fn = getattr(lib, name)
        fn.argtypes = args
        fn.restype = result


@functools.cache
def _library() -> ctypes.CDLL | None:
    if os.environ.get("PAGEDSERVE_CPU_KERNELS", "1") == "0":
        return None
    compiler = os.environ.get("CC") or shutil.which("cc") or shutil.which("gcc")
    if compiler is None:
        return None
    parts = [compiler, *_COMMON_FLAGS, *_LINK_FLAGS, _cpu_signature()]
    for name, flags in _SOURCES.items():
        parts += [name, (_CSRC / name).read_text(), *flags]
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
                _build(compiler, target)
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
    num_blocks, block_size, num_kv_heads, cache_head_dim = k_cache.shape
    if out.shape != q.shape or v_cache.shape != k_cache.shape or cache_head_dim != head_dim \
            or num_heads % num_kv_heads:
        raise ValueError(f"shapes do not agree: q {tuple(q.shape)}, out {tuple(out.shape)}, "
                         f"k/v cache {tuple(k_cache.shape)} / {tuple(v_cache.shape)}")
    if block_tables.dim() != 2 or block_tables.shape[0] != num_seqs or \
            seq_lens.shape != (num_seqs,):
        raise ValueError("block_tables and seq_lens need one row per query")
    _check_cpu(q, k_cache, v_cache, block_tables, seq_lens, out)
    for t in (q, out):
        if t.dtype != torch.float32 or t.stride(2) != 1 or t.stride(1) != head_dim or \
                (num_seqs > 1 and t.stride(0) < num_heads * head_dim):
            raise ValueError("q and out must be fp32 with contiguous heads, rows apart")
    if not (k_cache.is_contiguous() and v_cache.is_contiguous()) or \
            k_cache.dtype != torch.float32 or v_cache.dtype != torch.float32:
        raise ValueError("the KV cache must be contiguous fp32")
    if block_tables.stride(1) != 1 or not seq_lens.is_contiguous():
        raise ValueError("block_tables rows and seq_lens must be contiguous")
    if block_tables.dtype != torch.int64 or seq_lens.dtype != torch.int64:
        raise ValueError("block_tables and seq_lens must be int64")
    status = lib.paged_decode_attention_f32(
        q.data_ptr(), q.stride(0), k_cache.data_ptr(), v_cache.data_ptr(), num_blocks,
        block_tables.data_ptr(), block_tables.shape[1], block_tables.stride(0),
        seq_lens.data_ptr(),
        out.data_ptr(), out.stride(0), num_seqs, num_heads, num_kv_heads, head_dim,
        block_size, scale, torch.get_num_threads())
    if status == 2:
        raise ValueError("a sequence length exceeds its block table, or the table names a "
                         "block outside the cache")
    if status:
        raise MemoryError("decode attention could not allocate its scratch memory")


def _check_cpu(*tensors: torch.Tensor) -> None:
    # The kernels take data pointers as host memory: anything else must not reach them.
    for t in tensors:
        if t.device.type != "cpu":
            raise ValueError(f"the CPU kernels take CPU tensors, got one on {t.device}")


def _check_rows(name: str, t: torch.Tensor) -> None:
    if t.dtype != torch.float32 or t.dim() != 2 or t.stride(1) != 1 or \
            (t.shape[0] > 1 and t.stride(0) < t.shape[1]):
        raise ValueError(f"{name} must be a 2-d fp32 tensor with contiguous, separate rows")


def add_rms_norm(x: torch.Tensor, residual: torch.Tensor | None, weight: torch.Tensor,
                 eps: float) -> torch.Tensor:
    """RMSNorm of the rows of ``x`` ``[rows, dim]``, after ``x += residual`` when given.

    ``x`` is updated in place (it is the residual stream); returns the normalised rows.
    """
    lib = _library()
    assert lib is not None, "CPU kernels are not available"
    _check_rows("x", x)
    if residual is not None:
        _check_rows("residual", residual)
        if residual.shape != x.shape:
            raise ValueError(f"residual {tuple(residual.shape)} does not match x "
                             f"{tuple(x.shape)}")
    if weight.dtype != torch.float32 or weight.shape != x.shape[1:] or weight.stride(0) != 1:
        raise ValueError("weight must be a contiguous fp32 vector of the rows' width")
    _check_cpu(x, weight, *([] if residual is None else [residual]))
    out = torch.empty(x.shape, dtype=x.dtype, device=x.device)
    lib.add_rms_norm_f32(x.data_ptr(), x.stride(0),
                         None if residual is None else residual.data_ptr(),
                         0 if residual is None else residual.stride(0),
                         weight.data_ptr(), out.data_ptr(), out.stride(0), x.shape[0],
                         x.shape[1], eps, torch.get_num_threads())
    return out


def rotary_write_kv(qkv: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor,
                    k_cache: torch.Tensor, v_cache: torch.Tensor, slot_mapping: torch.Tensor,
                    num_heads: int, num_kv_heads: int) -> None:
    """Rotates the q and k heads of the fused ``qkv`` rows in place and stores k and v.

    ``qkv`` ``[tokens, (num_heads + 2 * num_kv_heads) * head_dim]``; ``cos``/``sin``
    ``[tokens, head_dim]`` contiguous; caches ``[num_blocks, block_size, num_kv_heads,
    head_dim]`` contiguous; ``slot_mapping`` ``[tokens]`` int64.
    """
    lib = _library()
    assert lib is not None, "CPU kernels are not available"
    _check_rows("qkv", qkv)
    head_dim = k_cache.shape[-1]
    tokens = qkv.shape[0]
    _check_cpu(qkv, cos, sin, k_cache, v_cache, slot_mapping)
    if k_cache.dim() != 4 or qkv.shape[1] != (num_heads + 2 * num_kv_heads) * head_dim or \
            k_cache.shape[2] != num_kv_heads or head_dim % 2:
        raise ValueError("qkv, the head counts and the cache do not agree")
    for name, t in (("cos", cos), ("sin", sin)):
        if t.dtype != torch.float32 or not t.is_contiguous() or t.shape != (tokens, head_dim):
            raise ValueError(f"{name} must be a contiguous fp32 [tokens, head_dim] table")
    if not (k_cache.is_contiguous() and v_cache.is_contiguous()) or \
            k_cache.dtype != torch.float32 or v_cache.dtype != torch.float32:
        raise ValueError("the KV cache must be contiguous fp32")
    if slot_mapping.dtype != torch.int64 or not slot_mapping.is_contiguous() or \
            slot_mapping.shape != (tokens,):
        raise ValueError("slot_mapping must be a contiguous int64 vector, one slot per token")
    if v_cache.shape != k_cache.shape:
        raise ValueError("the K and V caches must have the same shape")
    status = lib.rotary_write_kv_f32(
        qkv.data_ptr(), qkv.stride(0), cos.data_ptr(), sin.data_ptr(), k_cache.data_ptr(),
        v_cache.data_ptr(), k_cache.shape[0] * k_cache.shape[1], slot_mapping.data_ptr(),
        tokens, num_heads, num_kv_heads, head_dim, torch.get_num_threads())
    if status:
        raise ValueError("slot_mapping names a slot outside the cache")
