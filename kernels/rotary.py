"""Rotary position embedding of a step's queries and keys, fused with the KV cache write.

The torch implementation (rotate-half convention, as ``transformers``' Llama) is the reference
of the CPU kernel (:mod:`pagedserve.kernels.cpu`), which rotates each token's q|k|v row in place and
copies its keys and values to their cache slot in one pass, and of the Triton kernel
(:mod:`pagedserve.kernels.triton_cache`) that does the same on CUDA tensors
(:mod:`pagedserve.kernels.dispatch` chooses).
"""

from __future__ import annotations

import torch

from pagedserve.kernels import cpu, dispatch
from pagedserve.kernels.attention import write_kv
from pagedserve.kernels.norm import rms_norm


def apply_rotary(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Rotates ``x`` ``[tokens, heads, dim]`` by per-token ``cos``/``sin`` ``[tokens, dim]``."""
    half = x.shape[-1] // 2
    rotated = torch.cat((-x[..., half:], x[..., :half]), dim=-1)
    return x * cos[:, None, :] + rotated * sin[:, None, :]


def rotary_write_kv(qkv: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor,
                    k_cache: torch.Tensor, v_cache: torch.Tensor, slot_mapping: torch.Tensor,
                    num_heads: int, num_kv_heads: int, backend: str = "auto", *,
                    q_norm: torch.Tensor | None = None, k_norm: torch.Tensor | None = None,
                    norm_eps: float = 0.0) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Splits the fused projection ``qkv`` ``[tokens, (heads + 2 * kv_heads) * head_dim]``,
    rotates q and k, stores k and v at ``slot_mapping``; returns q, k, v as
    ``[tokens, heads, head_dim]`` tensors (views of ``qkv`` on the kernel path).

    With ``q_norm``/``k_norm`` (``[head_dim]`` weights, Qwen3) each q / k head is first
    RMS-normalised, as ``transformers`` does before the rotation.
    """
    tokens = qkv.shape[0]
    head_dim = k_cache.shape[-1]
    q_size, kv_size = num_heads * head_dim, num_kv_heads * head_dim
    q = qkv[:, :q_size].view(tokens, num_heads, head_dim)
    k = qkv[:, q_size: q_size + kv_size].view(tokens, num_kv_heads, head_dim)
    v = qkv[:, q_size + kv_size:].view(tokens, num_kv_heads, head_dim)
    path = dispatch.resolve(backend, qkv.device)
    if (path == "cpu" and qkv.dtype in cpu.DTYPES and cos.dtype == qkv.dtype
            and cpu.takes_cache(qkv.dtype, k_cache.dtype) and qkv.stride(1) == 1
            and cpu.available()):
        # In place: the views above now hold the (normalised and) rotated q and k.
        cpu.rotary_write_kv(qkv, cos.contiguous(), sin.contiguous(), k_cache, v_cache,
                            slot_mapping, num_heads, num_kv_heads, q_norm, k_norm, norm_eps)
        return q, k, v
    if q_norm is not None:
        q.copy_(rms_norm(q, q_norm, norm_eps))
    if k_norm is not None:
        k.copy_(rms_norm(k, k_norm, norm_eps))
    if path == "triton":
        # In place, as the CPU kernel.
        dispatch.triton_module("triton_cache", qkv.device).rotary_write_kv(
            q, k, v, cos, sin, k_cache, v_cache, slot_mapping)
        return q, k, v
    q, k = apply_rotary(q, cos, sin), apply_rotary(k, cos, sin)
    write_kv(k, v, k_cache, v_cache, slot_mapping, "torch")
    return q, k, v
