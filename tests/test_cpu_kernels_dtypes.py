"""The C kernels in bf16 and fp16, and their sliding-window, ALiBi, q/k-norm and LayerNorm
paths, against the torch references they replace (pagedserve.kernels.attention, norm, rotary)."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from pagedserve.kernels import cpu, norm, rotary
from pagedserve.kernels.attention import NULL_BLOCK, AttentionMetadata, paged_attention

pytestmark = pytest.mark.skipif(not cpu.available(), reason="no C compiler on this machine "
                                "(tests/test_attention.py asserts that one is then absent)")

DTYPES = [torch.float32, torch.bfloat16, torch.float16]
# One rounding of the output in bf16/fp16; reductions in another order in fp32.
TOLERANCE = {torch.float32: 1e-5, torch.bfloat16: 1e-2, torch.float16: 2e-3}


def _step(dtype: torch.dtype, query_lens: list[int], seq_lens: list[int]
          ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, AttentionMetadata]:
    """A step over a random paged cache."""
    torch.manual_seed(len(seq_lens))
    bs, kv_heads, heads, d = 4, 2, 6, 16
    k_cache = torch.randn(200, bs, kv_heads, d).to(dtype)
    v_cache = torch.randn(200, bs, kv_heads, d).to(dtype)
    k_cache[NULL_BLOCK] = 0
    v_cache[NULL_BLOCK] = 0
    free = iter(range(1, 200))
    tables = [[next(free) for _ in range(-(-n // bs))] for n in seq_lens]
    width = max(len(t) for t in tables)
    meta = AttentionMetadata(
        slot_mapping=torch.zeros(0, dtype=torch.long),
        block_tables=torch.tensor([t + [NULL_BLOCK] * (width - len(t)) for t in tables]),
        query_lens=query_lens, seq_lens=seq_lens,
        num_decodes=sum(1 for n in query_lens if n == 1), block_size=bs)
    q = torch.randn(sum(query_lens), heads, d).to(dtype)
    slots = torch.cat([meta.block_tables[i, torch.arange(n - q_n, n) // bs] * bs
                       + torch.arange(n - q_n, n) % bs
                       for i, (q_n, n) in enumerate(zip(query_lens, seq_lens))])
    flat_k, flat_v = k_cache.view(-1, kv_heads, d), v_cache.view(-1, kv_heads, d)
    return q, flat_k[slots], flat_v[slots], torch.stack([k_cache, v_cache]), meta


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("variant", ["plain", "window", "alibi"])
def test_decode_kernel_matches_torch(dtype: torch.dtype, variant: str,
                                     monkeypatch: pytest.MonkeyPatch) -> None:
    """Decodes through the C kernel equal the torch path (in fp32)."""
    lens = [1, 5, 17, 40, 33]
    window = 9 if variant == "window" else None
    slopes = torch.tensor([0.5, 0.25, 0.125, 0.06, 0.03, 0.01]) if variant == "alibi" else None
    q, k, v, cache, meta = _step(dtype, [1] * len(lens), lens)
    kw = dict(sliding_window=window, alibi_slopes=slopes)
    got = paged_attention(q, k, v, cache[0], cache[1], meta, 0.25, **kw)
    assert meta._decode_groups is None  # the kernel took the decodes
    monkeypatch.setattr(cpu, "available", lambda: False)
    _, _, _, _, torch_meta = _step(dtype, [1] * len(lens), lens)
    expected = paged_attention(q.float(), k.float(), v.float(), cache[0].float(),
                               cache[1].float(), torch_meta, 0.25, **kw)
    torch.testing.assert_close(got.float(), expected, rtol=TOLERANCE[dtype],
                               atol=TOLERANCE[dtype])


def test_window_never_reads_released_blocks() -> None:
    """With the blocks before each window released to the null block, outputs are those of
    the full tables (the kernel starts at the window)."""
    lens, window = [30, 41], 9
    q, k, v, cache, meta = _step(torch.float32, [1, 1], lens)
    full = paged_attention(q, k, v, cache[0], cache[1], meta, 0.25, sliding_window=window)
    tables = meta.block_tables.clone()
    for row, n in enumerate(lens):
        tables[row, : (n - window) // 4] = NULL_BLOCK
    released = AttentionMetadata(meta.slot_mapping, tables, meta.query_lens, meta.seq_lens,
                                 meta.num_decodes, meta.block_size)
    got = paged_attention(q, k, v, cache[0], cache[1], released, 0.25, sliding_window=window)
    torch.testing.assert_close(got, full, rtol=0, atol=0)


@pytest.mark.parametrize("dtype", DTYPES)
def test_norm_kernels_round_as_torch(dtype: torch.dtype) -> None:
    torch.manual_seed(3)
    x, residual = torch.randn(5, 48).to(dtype), torch.randn(5, 48).to(dtype)
    weight, bias = torch.randn(48).to(dtype), torch.randn(48).to(dtype)
    expected_sum = x + residual
    got = cpu.add_rms_norm(x.clone(), residual, weight, 1e-6)
    torch.testing.assert_close(got, norm.rms_norm(expected_sum, weight, 1e-6),
                               rtol=TOLERANCE[dtype], atol=TOLERANCE[dtype])
    summed = x.clone()
    got = cpu.add_layer_norm(summed, residual, weight, bias, 1e-5)
    assert torch.equal(summed, expected_sum)  # the residual add rounds as torch's
    torch.testing.assert_close(got, F.layer_norm(expected_sum, (48,), weight, bias, 1e-5),
                               rtol=TOLERANCE[dtype], atol=TOLERANCE[dtype])


@pytest.mark.parametrize("dtype", DTYPES)
def test_rotary_with_head_norms_matches_torch(dtype: torch.dtype,
                                              monkeypatch: pytest.MonkeyPatch) -> None:
    """Qwen3's per-head q/k RMSNorm fused into the rotary kernel, in every dtype."""
    torch.manual_seed(4)
    heads, kv_heads, d, tokens = 4, 2, 16, 7
    qkv = torch.randn(tokens, (heads + 2 * kv_heads) * d).to(dtype)
    angles = torch.rand(tokens, d // 2) * 10
    cos = torch.cat([angles.cos()] * 2, dim=-1).to(dtype)
    sin = torch.cat([angles.sin()] * 2, dim=-1).to(dtype)
    q_norm, k_norm = torch.randn(d).to(dtype), torch.randn(d).to(dtype)
    slots = torch.randperm(32)[:tokens]
    results = []
    for kernel in (True, False):
        if not kernel:
            monkeypatch.setattr(cpu, "available", lambda: False)
        caches = [torch.zeros(8, 4, kv_heads, d, dtype=dtype) for _ in range(2)]
        q, _, _ = rotary.rotary_write_kv(qkv.clone(), cos, sin, *caches, slots, heads,
                                         kv_heads, "auto" if kernel else "torch",
                                         q_norm=q_norm, k_norm=k_norm, norm_eps=1e-6)
        results.append((q.clone(), *caches))
    for got, expected in zip(results[0], results[1]):
        torch.testing.assert_close(got, expected, rtol=TOLERANCE[dtype], atol=TOLERANCE[dtype])
