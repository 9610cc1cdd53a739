"""pagedserve.kernels.norm and pagedserve.kernels.rotary: the CPU kernel path and the torch path
give the same."""

from __future__ import annotations

import pytest
import torch

from pagedserve.kernels import cpu, norm, rotary
from pagedserve.kernels.attention import write_kv


@pytest.fixture(params=["kernel", "torch", "float64"])
def dtype(request: pytest.FixtureRequest, monkeypatch: pytest.MonkeyPatch) -> torch.dtype:
    """The path under test: the CPU kernel, torch ops (kernel unavailable), or float64 (the
    kernel is available but only takes fp32). Returns the dtype to test in."""
    if request.param == "torch":
        monkeypatch.setattr(cpu, "available", lambda: False)
    return torch.float64 if request.param == "float64" else torch.float32


def test_add_rms_norm_paths_agree(dtype: torch.dtype) -> None:
    torch.manual_seed(1)
    h, delta, weight = torch.randn(6, 48, dtype=dtype), torch.randn(6, 48, dtype=dtype), \
        torch.randn(48, dtype=dtype)
    expected_h = h + delta
    expected = weight * (expected_h * torch.rsqrt(expected_h.pow(2).mean(-1, keepdim=True)
                                                  + 1e-6))
    got = norm.add_rms_norm(h, delta, weight, 1e-6)
    torch.testing.assert_close(h, expected_h)  # the residual stream is updated in place
    torch.testing.assert_close(got, expected)
    torch.testing.assert_close(norm.add_rms_norm(h.clone(), None, weight, 1e-6),
                               norm.rms_norm(h, weight, 1e-6))


def test_rotary_write_kv_paths_agree(dtype: torch.dtype) -> None:
    torch.manual_seed(2)
    heads, kv_heads, d, tokens = 4, 2, 16, 9
    qkv = torch.randn(tokens, (heads + 2 * kv_heads) * d, dtype=dtype)
    angles = torch.rand(tokens, d // 2, dtype=dtype) * 10
    cos = torch.cat([angles.cos()] * 2, dim=-1)
    sin = torch.cat([angles.sin()] * 2, dim=-1)
    slots = torch.randperm(8 * 4)[:tokens]
    k_cache, v_cache, k_ref, v_ref = (torch.zeros(8, 4, kv_heads, d, dtype=dtype)
                                      for _ in range(4))
    q_ref = rotary.apply_rotary(qkv[:, :heads * d].reshape(tokens, heads, d), cos, sin)
    k_new = rotary.apply_rotary(qkv[:, heads * d: (heads + kv_heads) * d]
                                .reshape(tokens, kv_heads, d), cos, sin)
    v_new = qkv[:, (heads + kv_heads) * d:].reshape(tokens, kv_heads, d).clone()
    write_kv(k_new, v_new, k_ref, v_ref, slots)
    q, k, v = rotary.rotary_write_kv(qkv, cos, sin, k_cache, v_cache, slots, heads, kv_heads)
    torch.testing.assert_close(q, q_ref)
    torch.testing.assert_close(k, k_new)
    torch.testing.assert_close(v, v_new)
    torch.testing.assert_close(k_cache, k_ref)
    torch.testing.assert_close(v_cache, v_ref)
