"""KV cache write in the Triton language, rotary embedding applied on the way.

The GPU path behind :func:`kernels.attention.write_kv` and :func:`kernels.rotary.rotary_write_kv`.
One program per (token, head): a query head is rotated in place; a KV head has its key rotated
(in place, for the caller's view) and stored with its value at the token's cache slot. The torch
path takes eight passes over the step's q|k|v for the same work. Tokens with a negative slot
(padding) are rotated but not stored. Arithmetic is fp32, rounded once to the cache's dtype.

Imported through :mod:`kernels.backend` only, which sets ``TRITON_INTERPRET=1`` first on CPUs.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl


@triton.jit
def _rotate(ptr, cos_ptr, sin_ptr, HALF: tl.constexpr, HALF_PAD: tl.constexpr):
    """Rotate-half rotary embedding of the head at ``ptr``, written back in place; returns
    both halves rotated (fp32)."""
    offs = tl.arange(0, HALF_PAD)
    ok = offs < HALF
    x1 = tl.load(ptr + offs, mask=ok, other=0.0).to(tl.float32)
    x2 = tl.load(ptr + HALF + offs, mask=ok, other=0.0).to(tl.float32)
    c1 = tl.load(cos_ptr + offs, mask=ok, other=0.0).to(tl.float32)
    c2 = tl.load(cos_ptr + HALF + offs, mask=ok, other=0.0).to(tl.float32)
    s1 = tl.load(sin_ptr + offs, mask=ok, other=0.0).to(tl.float32)
    s2 = tl.load(sin_ptr + HALF + offs, mask=ok, other=0.0).to(tl.float32)
    y1 = x1 * c1 - x2 * s1
    y2 = x2 * c2 + x1 * s2
    tl.store(ptr + offs, y1.to(ptr.dtype.element_ty), mask=ok)
    tl.store(ptr + HALF + offs, y2.to(ptr.dtype.element_ty), mask=ok)
    return y1, y2


@triton.jit
def _cache_write_kernel(
    q_ptr, k_ptr, v_ptr, cos_ptr, sin_ptr, k_cache_ptr, v_cache_ptr, slot_ptr,
    stride_q_t, stride_q_h, stride_k_t, stride_k_h, stride_v_t, stride_v_h, stride_cos_t,
    stride_kc_s, stride_kc_h, stride_vc_s, stride_vc_h,
    NUM_HEADS: tl.constexpr, HEAD_DIM: tl.constexpr, HALF_PAD: tl.constexpr,
    ROTARY: tl.constexpr,
):
    token = tl.program_id(0).to(tl.int64)
    head = tl.program_id(1)
    half: tl.constexpr = HEAD_DIM // 2
    cos_row = cos_ptr + token * stride_cos_t
    sin_row = sin_ptr + token * stride_cos_t
    if head < NUM_HEADS:  # only launched with ROTARY
        _rotate(q_ptr + token * stride_q_t + head * stride_q_h, cos_row, sin_row, half,
                HALF_PAD)
        return
    kv_head = head - NUM_HEADS
    slot = tl.load(slot_ptr + token).to(tl.int64)
    offs = tl.arange(0, HALF_PAD)
    ok = offs < half
    k_row = k_ptr + token * stride_k_t + kv_head * stride_k_h
    if ROTARY:
        k1, k2 = _rotate(k_row, cos_row, sin_row, half, HALF_PAD)
    else:
        k1 = tl.load(k_row + offs, mask=ok, other=0.0)
        k2 = tl.load(k_row + half + offs, mask=ok, other=0.0)
    if slot >= 0:
        v_row = v_ptr + token * stride_v_t + kv_head * stride_v_h
        kc = k_cache_ptr + slot * stride_kc_s + kv_head * stride_kc_h
        vc = v_cache_ptr + slot * stride_vc_s + kv_head * stride_vc_h
        tl.store(kc + offs, k1.to(k_cache_ptr.dtype.element_ty), mask=ok)
        tl.store(kc + half + offs, k2.to(k_cache_ptr.dtype.element_ty), mask=ok)
        tl.store(vc + offs, tl.load(v_row + offs, mask=ok), mask=ok)
        tl.store(vc + half + offs, tl.load(v_row + half + offs, mask=ok), mask=ok)


def _check(k: torch.Tensor, v: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor,
           slot_mapping: torch.Tensor) -> None:
    tokens, kv_heads, head_dim = k.shape
    if v.shape != k.shape or k_cache.shape != v_cache.shape or k_cache.dim() != 4 or \
            k_cache.shape[2:] != (kv_heads, head_dim) or slot_mapping.shape != (tokens,):
        raise ValueError(f"k {tuple(k.shape)}, v {tuple(v.shape)}, caches "
                         f"{tuple(k_cache.shape)} and slots {tuple(slot_mapping.shape)} disagree")
    if head_dim % 2 or k.stride(2) != 1 or v.stride(2) != 1 or \
            k_cache.stride(3) != 1 or v_cache.stride(3) != 1 or \
            k_cache.stride(0) != k_cache.shape[1] * k_cache.stride(1) or \
            v_cache.stride(0) != v_cache.shape[1] * v_cache.stride(1):
        raise ValueError("head dimensions must be contiguous and even, cache slots evenly apart")


def _launch(q: torch.Tensor | None, k: torch.Tensor, v: torch.Tensor, cos: torch.Tensor | None,
            sin: torch.Tensor | None, k_cache: torch.Tensor, v_cache: torch.Tensor,
            slot_mapping: torch.Tensor) -> None:
    _check(k, v, k_cache, v_cache, slot_mapping)
    tokens, kv_heads, head_dim = k.shape
    if tokens == 0:
        return
    rotary = q is not None and cos is not None and sin is not None
    num_heads = q.shape[1] if rotary and q is not None else 0
    qq = q if q is not None else k
    cc = cos if cos is not None else k
    ss = sin if sin is not None else k
    _cache_write_kernel[(tokens, num_heads + kv_heads)](
        qq, k, v, cc, ss, k_cache, v_cache, slot_mapping,
        qq.stride(0), qq.stride(1), k.stride(0), k.stride(1), v.stride(0), v.stride(1),
        cc.stride(0), k_cache.stride(1), k_cache.stride(2), v_cache.stride(1),
        v_cache.stride(2),
        NUM_HEADS=num_heads, HEAD_DIM=head_dim,
        HALF_PAD=triton.next_power_of_2(head_dim // 2), ROTARY=rotary, num_warps=1)


def write_kv(k: torch.Tensor, v: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor,
             slot_mapping: torch.Tensor) -> None:
    """Stores keys and values ``[tokens, kv_heads, head_dim]`` at their slots (negative
    slots skipped)."""
    _launch(None, k, v, None, None, k_cache, v_cache, slot_mapping)


def rotary_write_kv(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, cos: torch.Tensor,
                    sin: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor,
                    slot_mapping: torch.Tensor) -> None:
    """Rotates ``q`` ``[tokens, heads, head_dim]`` and ``k`` in place by ``cos``/``sin``
    ``[tokens, head_dim]`` (rows contiguous) and stores k and v at their slots."""
    if q.shape[0] != k.shape[0] or q.shape[2] != k.shape[2] or q.stride(2) != 1 or \
            cos.shape != (q.shape[0], q.shape[2]) or sin.shape != cos.shape or \
            cos.stride(1) != 1 or sin.stride() != cos.stride():
        raise ValueError("q, k and the rotary tables disagree")
    _launch(q, k, v, cos, sin, k_cache, v_cache, slot_mapping)
