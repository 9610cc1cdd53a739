"""RMSNorm, optionally fused with the residual add in front of it.

The torch implementation follows ``transformers``' ``LlamaRMSNorm`` operation by operation
(normalised in fp32, cast back, then scaled) and is the reference of the CPU kernel
(:mod:`kernels.cpu`), which makes one pass per row instead of six.
"""

from __future__ import annotations

import torch

from kernels import cpu


def rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    """``weight * x / sqrt(mean(x ** 2) + eps)`` over the last dimension, in torch ops."""
    h = x.float()
    h = h * torch.rsqrt(h.pow(2).mean(-1, keepdim=True) + eps)
    return weight * h.to(x.dtype)


def add_rms_norm(x: torch.Tensor, residual: torch.Tensor | None, weight: torch.Tensor,
                 eps: float) -> torch.Tensor:
    """Adds ``residual`` into ``x`` in place (when given), then returns ``rms_norm(x)``.

    ``x`` ``[tokens, hidden]`` is the residual stream: the caller owns it and sees the sum.
    """
    if (x.device.type == "cpu" and x.dtype == torch.float32 and weight.dtype == torch.float32
            and x.dim() == 2 and x.stride(1) == 1 and cpu.available()):
        return cpu.add_rms_norm(x, residual, weight, eps)
    if residual is not None:
        x += residual
    return rms_norm(x, weight, eps)
