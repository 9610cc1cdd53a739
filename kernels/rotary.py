"""Rotary position embedding of a step's queries and keys, fused with the KV cache write.

The torch implementation (rotate-half convention, as ``transformers``' Llama) is the reference
of the CPU kernel (:mod:`kernels.cpu`), which rotates each token's q|k|v row in place and copies
its keys and values to their cache slot in one pass.
"""

from __future__ import annotations

import torch

from kernels import cpu
from kernels.attention import write_kv


def apply_rotary(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Rotates ``x`` ``[tokens, heads, dim]`` by per-token ``cos``/``sin`` ``[tokens, dim]``."""
    half = x.shape[-1] // 2
    rotated = torch.cat((-x[..., half:], x[..., :half]), dim=-1)
    return x * cos[:, None, :] + rotated * sin[:, None, :]


def rotary_write_kv(qkv: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor,
                    k_cache: torch.Tensor, v_cache: torch.Tensor, slot_mapping: torch.Tensor,
                    num_heads: int, num_kv_heads: int
                    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Splits the fused projection ``qkv`` ``[tokens, (heads + 2 * kv_heads) * head_dim]``,
    rotates q and k, stores k and v at ``slot_mapping``; returns q, k, v as
    ``[tokens, heads, head_dim]`` tensors (views of ``qkv`` on the kernel path).
    """
    tokens = qkv.shape[0]
    head_dim = k_cache.shape[-1]
    q_size, kv_size = num_heads * head_dim, num_kv_heads * head_dim
    q = qkv[:, :q_size].view(tokens, num_heads, head_dim)
    k = qkv[:, q_size: q_size + kv_size].view(tokens, num_kv_heads, head_dim)
    v = qkv[:, q_size + kv_size:].view(tokens, num_kv_heads, head_dim)
    if (qkv.device.type == "cpu" and qkv.dtype == torch.float32 and cos.dtype == torch.float32
            and k_cache.dtype == torch.float32 and qkv.stride(1) == 1 and cpu.available()):
        # In place: the views above now hold the rotated q and k.
        cpu.rotary_write_kv(qkv, cos.contiguous(), sin.contiguous(), k_cache, v_cache,
                            slot_mapping, num_heads, num_kv_heads)
        return q, k, v
    q, k = apply_rotary(q, cos, sin), apply_rotary(k, cos, sin)
    write_kv(k, v, k_cache, v_cache, slot_mapping)
    return q, k, v
