"""RMSNorm and LayerNorm, optionally fused with the residual add in front of them.

The torch implementation follows ``transformers``' ``LlamaRMSNorm`` operation by operation
(normalised in fp32, cast back, then scaled) and is the reference of the CPU kernel
(:mod:`pagedserve.kernels.cpu`), which makes one pass per row instead of six, and of the Triton
kernel (:mod:`pagedserve.kernels.triton_norm`) that runs on CUDA tensors
(:mod:`pagedserve.kernels.dispatch` chooses).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from pagedserve.kernels import cpu, dispatch


def rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    """``weight * x / sqrt(mean(x ** 2) + eps)`` over the last dimension, in torch ops."""
    h = x.float()
    h = h * torch.rsqrt(h.pow(2).mean(-1, keepdim=True) + eps)
    return weight * h.to(x.dtype)


def add_rms_norm(x: torch.Tensor, residual: torch.Tensor | None, weight: torch.Tensor,
                 eps: float, backend: str = "auto") -> torch.Tensor:
    """Adds ``residual`` into ``x`` in place (when given), then returns ``rms_norm(x)``.

    ``x`` ``[tokens, hidden]`` is the residual stream: the caller owns it and sees the sum.
    """
    path = dispatch.resolve(backend, x.device)
    if path == "triton":
        return dispatch.triton_module("triton_norm", x.device).add_rms_norm(x, residual, weight,
                                                                            eps)
    if (path == "cpu" and x.dtype in cpu.DTYPES and weight.dtype == x.dtype
            and x.dim() == 2 and x.stride(1) == 1 and cpu.available()):
        return cpu.add_rms_norm(x, residual, weight, eps)
    if residual is not None:
        x += residual
    return rms_norm(x, weight, eps)


def add_layer_norm(x: torch.Tensor, residual: torch.Tensor | None, weight: torch.Tensor,
                   bias: torch.Tensor | None, eps: float, backend: str = "auto") -> torch.Tensor:
    """Adds ``residual`` into ``x`` in place (when given), then returns ``LayerNorm(x)``
    (``torch.nn.functional.layer_norm``, the reference: Falcon's norms).

    ``x`` ``[tokens, hidden]`` is the residual stream: the caller owns it and sees the sum.
    """
    if (dispatch.resolve(backend, x.device) == "cpu" and x.dtype in cpu.DTYPES
            and weight.dtype == x.dtype and x.dim() == 2 and x.stride(1) == 1):
        return cpu.add_layer_norm(x, residual, weight, bias, eps)
    if residual is not None:
        x += residual
    return F.layer_norm(x, x.shape[-1:], weight, bias, eps)
