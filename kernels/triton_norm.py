"""Residual add + RMSNorm in the Triton language: the GPU path behind ``add_rms_norm``.

One program per row reads the residual stream and the delta once, writes the sum back (the
stream is updated in place) and the normalised row: one pass where the torch ops take seven.
Rounding follows ``transformers``' ``LlamaRMSNorm``: the sum in the stream's dtype, the
normalisation in fp32, cast back before the weight multiplies it.

Imported through :mod:`pagedserve.kernels.dispatch` only, which sets ``TRITON_INTERPRET=1`` first on
CPUs.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from pagedserve.kernels.dispatch import on_device


@triton.jit
def _add_rms_norm_kernel(
    x_ptr, residual_ptr, weight_ptr, out_ptr, stride_x, stride_r, stride_o, eps,
    DIM: tl.constexpr, BLOCK: tl.constexpr, HAS_RESIDUAL: tl.constexpr,
):
    row = tl.program_id(0).to(tl.int64)
    offs = tl.arange(0, BLOCK)
    ok = offs < DIM
    # Each operation in fp32, rounded to the storage dtype where torch's bf16/fp16 ops round.
    x = tl.load(x_ptr + row * stride_x + offs, mask=ok, other=0.0)
    if HAS_RESIDUAL:
        r = tl.load(residual_ptr + row * stride_r + offs, mask=ok, other=0.0)
        x = (x.to(tl.float32) + r.to(tl.float32)).to(x_ptr.dtype.element_ty)
        tl.store(x_ptr + row * stride_x + offs, x, mask=ok)
    h = x.to(tl.float32)
    h = h * tl.math.rsqrt(tl.sum(h * h, axis=0) / DIM + eps)
    h = h.to(x_ptr.dtype.element_ty).to(tl.float32)
    weight = tl.load(weight_ptr + offs, mask=ok, other=0.0).to(tl.float32)
    tl.store(out_ptr + row * stride_o + offs, (weight * h).to(out_ptr.dtype.element_ty), mask=ok)


def add_rms_norm(x: torch.Tensor, residual: torch.Tensor | None, weight: torch.Tensor,
                 eps: float) -> torch.Tensor:
    """RMSNorm of the rows of ``x`` ``[rows, dim]`` after ``x += residual`` (in place) when
    given; returns the normalised rows (in the dtype ``weight * x`` has in torch)."""
    if x.dim() != 2 or x.stride(1) != 1 or weight.shape != x.shape[1:] or \
            (residual is not None and (residual.shape != x.shape or residual.stride(1) != 1)):
        raise ValueError(f"x {tuple(x.shape)}, residual and weight {tuple(weight.shape)} must "
                         "be rows of the weight's width with contiguous columns")
    weight = weight.contiguous()
    out = torch.empty(x.shape, dtype=torch.promote_types(x.dtype, weight.dtype),
                      device=x.device)
    rows, dim = x.shape
    if rows == 0:
        return out
    block = triton.next_power_of_2(dim)
    r = residual if residual is not None else x
    with on_device(x):
        _add_rms_norm_kernel[(rows,)](
            x, r, weight, out, x.stride(0), r.stride(0), out.stride(0), eps,
            DIM=dim, BLOCK=block, HAS_RESIDUAL=residual is not None,
            num_warps=min(16, max(1, block // 256)))
    return out
