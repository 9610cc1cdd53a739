"""pagedserve.kernels.linear against torch's own ops, on the oneDNN path (fp32 CPU) and the
fallback."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from pagedserve.kernels.linear import linear, silu_gated


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("bias", [False, True])
@pytest.mark.parametrize("rows", [1, 7, 300])
def test_linear_and_silu_gated_match_torch(dtype: torch.dtype, bias: bool, rows: int) -> None:
    torch.manual_seed(rows)
    x = torch.randn(rows, 96, dtype=dtype)
    w, gate, up = (torch.randn(n, 96, dtype=dtype) * 0.1 for n in (40, 64, 64))
    b, gate_b, up_b = ((torch.randn(n, dtype=dtype) if bias else None) for n in (40, 64, 64))
    torch.testing.assert_close(linear(x, w, b), F.linear(x, w, b))
    torch.testing.assert_close(silu_gated(x, gate, up, gate_b, up_b),
                               F.silu(F.linear(x, gate, gate_b)) * F.linear(x, up, up_b))


def test_linear_takes_strided_and_batched_inputs() -> None:
    x = torch.randn(5, 3, 200)[..., 10:106]
    w = torch.randn(40, 96)
    torch.testing.assert_close(linear(x, w), F.linear(x, w))
