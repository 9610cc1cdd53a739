"""KV cache write in the Triton language, rotary embedding applied on the way.

The GPU path behind :func:`pagedserve.kernels.attention.write_kv` and
:func:`pagedserve.kernels.rotary.rotary_write_kv`. One program per token, all its heads as one tile:
query heads are rotated in place; keys are rotated (in place, for the caller's view) and stored with
the values at the token's cache slot. The torch path takes eight passes over the step's q|k|v for
the same work. Tokens with a negative slot (padding) are rotated but not stored. Arithmetic is fp32,
rounded once to the cache's dtype.

Imported through :mod:`pagedserve.kernels.dispatch` only, which sets ``TRITON_INTERPRET=1`` first on
CPUs.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from pagedserve.kernels.dispatch import on_device


@triton.jit
def _cache_write_kernel(
    q_ptr, k_ptr, v_ptr, cos_ptr, sin_ptr, k_cache_ptr, v_cache_ptr, slot_ptr,
    stride_q_t, stride_q_h, stride_k_t, stride_k_h, stride_v_t, stride_v_h, stride_cos_t,
    stride_kc_s, stride_kc_h, stride_vc_s, stride_vc_h,
    NUM_HEADS: tl.constexpr, NUM_KV_HEADS: tl.constexpr, HEADS_PAD: tl.constexpr,
    HEAD_DIM: tl.constexpr, HALF_PAD: tl.constexpr, ROTARY: tl.constexpr,
):
    token = tl.program_id(0).to(tl.int64)
    half: tl.constexpr = HEAD_DIM // 2
    offs_h = tl.arange(0, HEADS_PAD)
    offs_d = tl.arange(0, HALF_PAD)
    d_ok = offs_d < half
    kv_ok = (offs_h < NUM_KV_HEADS)[:, None] & d_ok[None, :]
    k_at = k_ptr + token * stride_k_t + offs_h[:, None] * stride_k_h + offs_d[None, :]
    k1 = tl.load(k_at, mask=kv_ok, other=0.0).to(tl.float32)
    k2 = tl.load(k_at + half, mask=kv_ok, other=0.0).to(tl.float32)
    if ROTARY:
        # Rotate-half: (x1, x2) -> (x1 * cos1 - x2 * sin1, x2 * cos2 + x1 * sin2).
        c1 = tl.load(cos_ptr + token * stride_cos_t + offs_d, mask=d_ok, other=0.0)
        c2 = tl.load(cos_ptr + token * stride_cos_t + half + offs_d, mask=d_ok, other=0.0)
        s1 = tl.load(sin_ptr + token * stride_cos_t + offs_d, mask=d_ok, other=0.0)
        s2 = tl.load(sin_ptr + token * stride_cos_t + half + offs_d, mask=d_ok, other=0.0)
        c1, c2 = c1.to(tl.float32)[None, :], c2.to(tl.float32)[None, :]
        s1, s2 = s1.to(tl.float32)[None, :], s2.to(tl.float32)[None, :]
        q_ok = (offs_h < NUM_HEADS)[:, None] & d_ok[None, :]
        q_at = q_ptr + token * stride_q_t + offs_h[:, None] * stride_q_h + offs_d[None, :]
        q1 = tl.load(q_at, mask=q_ok, other=0.0).to(tl.float32)
        q2 = tl.load(q_at + half, mask=q_ok, other=0.0).to(tl.float32)
        tl.store(q_at, (q1 * c1 - q2 * s1).to(q_ptr.dtype.element_ty), mask=q_ok)
        tl.store(q_at + half, (q2 * c2 + q1 * s2).to(q_ptr.dtype.element_ty), mask=q_ok)
        k1, k2 = k1 * c1 - k2 * s1, k2 * c2 + k1 * s2
        tl.store(k_at, k1.to(k_ptr.dtype.element_ty), mask=kv_ok)
        tl.store(k_at + half, k2.to(k_ptr.dtype.element_ty), mask=kv_ok)
    slot = tl.load(slot_ptr + token).to(tl.int64)
    if slot >= 0:
        v_at = v_ptr + token * stride_v_t + offs_h[:, None] * stride_v_h + offs_d[None, :]
        kc = k_cache_ptr + slot * stride_kc_s + offs_h[:, None] * stride_kc_h + offs_d[None, :]
        vc = v_cache_ptr + slot * stride_vc_s + offs_h[:, None] * stride_vc_h + offs_d[None, :]
        tl.store(kc, k1.to(k_cache_ptr.dtype.element_ty), mask=kv_ok)
        tl.store(kc + half, k2.to(k_cache_ptr.dtype.element_ty), mask=kv_ok)
        tl.store(vc, tl.load(v_at, mask=kv_ok), mask=kv_ok)
        tl.store(vc + half, tl.load(v_at + half, mask=kv_ok), mask=kv_ok)


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
    heads_pad = triton.next_power_of_2(max(num_heads, kv_heads))
    half_pad = triton.next_power_of_2(head_dim // 2)
    with on_device(k):
        _cache_write_kernel[(tokens,)](
            qq, k, v, cc, ss, k_cache, v_cache, slot_mapping,
            qq.stride(0), qq.stride(1), k.stride(0), k.stride(1), v.stride(0), v.stride(1),
            cc.stride(0), k_cache.stride(1), k_cache.stride(2), v_cache.stride(1),
            v_cache.stride(2),
            NUM_HEADS=num_heads, NUM_KV_HEADS=kv_heads, HEADS_PAD=heads_pad,
            HEAD_DIM=head_dim, HALF_PAD=half_pad, ROTARY=rotary,
            num_warps=min(8, max(1, heads_pad * half_pad // 512)))


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
