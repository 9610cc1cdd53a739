"""paged_attention against a naive per-sequence reference: cascade decode groups, decodes
attended in place by the CPU kernel and by torch ops, other dtypes."""

from __future__ import annotations

import shutil

import pytest
import torch

from pagedserve.kernels import attention, cpu
from pagedserve.kernels.attention import NULL_BLOCK, AttentionMetadata, paged_attention


def _reference(q: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor,
               tables: list[list[int]], query_lens: list[int], seq_lens: list[int],
               scale: float) -> torch.Tensor:
    bs = k_cache.shape[1]
    group = q.shape[1] // k_cache.shape[2]
    outs, start = [], 0
    for table, n, length in zip(tables, query_lens, seq_lens):
        slots = torch.tensor([table[p // bs] * bs + p % bs for p in range(length)])
        keys = k_cache.view(-1, *k_cache.shape[2:])[slots].repeat_interleave(group, dim=1)
        values = v_cache.view(-1, *v_cache.shape[2:])[slots].repeat_interleave(group, dim=1)
        query = q[start: start + n]
        scores = torch.einsum("qhd,khd->hqk", query, keys) * scale
        positions = torch.arange(length - n, length)[:, None]
        scores = scores.masked_fill(torch.arange(length)[None, :] > positions, float("-inf"))
        outs.append(torch.einsum("hqk,khd->qhd", scores.softmax(-1), values))
        start += n
    return torch.cat(outs)


@pytest.mark.parametrize("path", ["kernel", "torch", "float64"])
@pytest.mark.parametrize(("shared_blocks", "num_decodes"), [(0, 5), (1, 4), (10, 7), (10, 1),
                                                              (9, 20), (0, 40)])
def test_paged_attention_matches_reference(shared_blocks: int, num_decodes: int, path: str,
                                           monkeypatch: pytest.MonkeyPatch) -> None:
    """``kernel``: decodes without a shared prefix go to the CPU kernel; ``torch``: the kernel
    is unavailable; ``float64``: the kernel is available but only takes fp32."""
    if path == "torch":
        monkeypatch.setattr(attention.cpu, "available", lambda: False)
    torch.manual_seed(shared_blocks * 31 + num_decodes)
    dtype = torch.float64 if path == "float64" else torch.float32
    bs, kv_heads, heads, d, num_blocks = 4, 2, 6, 16, 400
    k_cache = torch.randn(num_blocks, bs, kv_heads, d, dtype=dtype)
    v_cache = torch.randn(num_blocks, bs, kv_heads, d, dtype=dtype)
    k_cache[NULL_BLOCK] = 0
    v_cache[NULL_BLOCK] = 0
    free = iter(range(1, num_blocks))
    shared = [next(free) for _ in range(shared_blocks)]  # a prompt all decodes share
    tables, seq_lens, query_lens = [], [], []
    for i in range(num_decodes):
        length = shared_blocks * bs + 1 + (i * 7) % 13
        own = [next(free) for _ in range(-(-length // bs) - shared_blocks)]
        tables.append(shared + own)
        seq_lens.append(length)
        query_lens.append(1)
    for n, cached in ((9, 0), (5, 11)):  # prefills after the decodes, fresh and over a context
        length = cached + n
        tables.append([next(free) for _ in range(-(-length // bs))])
        seq_lens.append(length)
        query_lens.append(n)
    order = sorted(range(num_decodes), key=lambda i: seq_lens[i]) + list(
        range(num_decodes, len(tables)))
    tables = [tables[i] for i in order]
    seq_lens = [seq_lens[i] for i in order]
    width = max(len(t) for t in tables)
    block_tables = torch.tensor([t + [NULL_BLOCK] * (width - len(t)) for t in tables])
    meta = AttentionMetadata(slot_mapping=torch.zeros(0, dtype=torch.long),
                             block_tables=block_tables, query_lens=query_lens,
                             seq_lens=seq_lens, num_decodes=num_decodes, block_size=bs)
    q = torch.randn(sum(query_lens), heads, d, dtype=dtype)
    # The fresh prefill reads its own keys from k/v; make them the cache's contents.
    flat_k = k_cache.view(-1, kv_heads, d)
    flat_v = v_cache.view(-1, kv_heads, d)
    slots = torch.cat([torch.tensor([t[p // bs] * bs + p % bs
                                     for p in range(length - n, length)])
                       for t, n, length in zip(tables, query_lens, seq_lens)])
    got = paged_attention(q, flat_k[slots], flat_v[slots], k_cache, v_cache, meta, d ** -0.5)
    # The kernel took every decode, or the torch groups (built on first use) did.
    assert (meta._decode_groups is None) == (path == "kernel")
    cascades = [g.shared_slots is not None for g in meta.torch_decode_groups()]
    assert any(cascades) == (shared_blocks * bs >= 32 and num_decodes > 1)
    expected = _reference(q, k_cache, v_cache, tables, query_lens, seq_lens, d ** -0.5)
    torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-5)


def test_cpu_kernel_is_built_where_a_compiler_exists() -> None:
    """The in-place kernel is what makes decode fast on CPUs: a silent fallback is a defect."""
    assert cpu.available() == (shutil.which("cc") is not None or shutil.which("gcc") is not None)
