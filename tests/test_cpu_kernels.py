"""The C kernels of kernels/cpu.py against torch references, and how they are built."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from kernels import cpu

ROOT = Path(__file__).resolve().parent.parent

pytestmark = pytest.mark.skipif(not cpu.available(), reason="no C compiler on this machine "
                                "(tests/test_attention.py asserts that one is then absent)")


def _reference(q: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor,
               tables: list[list[int]], lens: list[int], scale: float) -> torch.Tensor:
    bs, kv_heads = k_cache.shape[1], k_cache.shape[2]
    group = q.shape[1] // kv_heads
    rows = []
    for i, (table, length) in enumerate(zip(tables, lens)):
        slots = torch.tensor([table[p // bs] * bs + p % bs for p in range(length)])
        keys = k_cache.flatten(0, 1)[slots].double().repeat_interleave(group, dim=1)
        values = v_cache.flatten(0, 1)[slots].double().repeat_interleave(group, dim=1)
        scores = torch.einsum("hd,khd->hk", q[i].double(), keys) * scale
        rows.append(torch.einsum("hk,khd->hd", scores.softmax(-1), values))
    return torch.stack(rows).float()


@pytest.mark.parametrize(("head_dim", "kv_heads", "heads", "block_size"),
                         [(64, 3, 9, 16), (128, 2, 8, 16), (64, 4, 4, 8), (24, 1, 3, 5)])
def test_decode_attention_matches_reference(head_dim: int, kv_heads: int, heads: int,
                                            block_size: int) -> None:
    torch.manual_seed(head_dim + kv_heads + block_size)
    num_blocks = 300
    k_cache = torch.randn(num_blocks, block_size, kv_heads, head_dim)
    v_cache = torch.randn(num_blocks, block_size, kv_heads, head_dim)
    # Ragged lengths: one token, exact block multiples, partial last blocks, long contexts.
    lens = [1, block_size, block_size + 1, 3 * block_size, 7, 200, 2 * block_size - 1, 333]
    free = torch.randperm(num_blocks - 1) + 1  # scattered blocks, never the null block
    tables, used = [], 0
    for length in lens:
        n = -(-length // block_size)
        tables.append(free[used: used + n].tolist())
        used += n
    width = max(len(t) for t in tables) + 2  # padded wider than any table needs
    block_tables = torch.tensor([t + [0] * (width - len(t)) for t in tables])
    # Query rows strided inside a wider buffer, as slices of a step's q are.
    q = torch.randn(len(lens), heads * head_dim + 40)[:, :heads * head_dim].view(
        len(lens), heads, head_dim)
    out = torch.full((len(lens), heads, head_dim), float("nan"))
    scale = head_dim ** -0.5
    cpu.decode_attention(q, k_cache, v_cache, block_tables, torch.tensor(lens), scale, out)
    expected = _reference(q, k_cache, v_cache, tables, lens, scale)
    torch.testing.assert_close(out, expected, rtol=1e-5, atol=1e-5)


def test_decode_attention_refuses_layouts_it_cannot_read() -> None:
    k_cache = torch.randn(4, 4, 1, 8)
    tables, lens = torch.tensor([[1]]), torch.tensor([3])
    out = torch.empty(1, 2, 8)
    with pytest.raises(ValueError, match="fp32"):
        cpu.decode_attention(torch.randn(1, 2, 8, dtype=torch.float64), k_cache, k_cache,
                             tables, lens, 1.0, out)
    with pytest.raises(ValueError, match="contiguous"):
        cpu.decode_attention(torch.randn(1, 2, 8), k_cache.transpose(0, 1), k_cache,
                             tables, lens, 1.0, out)
    with pytest.raises(ValueError, match="int64"):
        cpu.decode_attention(torch.randn(1, 2, 8), k_cache, k_cache, tables.int(), lens, 1.0,
                             out)


def _available_in_subprocess(env: dict[str, str]) -> str:
    code = "from kernels import cpu; print(cpu.available())"
    done = subprocess.run([sys.executable, "-c", code], cwd=ROOT, env={**os.environ, **env},
                          capture_output=True, text=True, check=True, timeout=120)
    return done.stdout.strip()


def test_builds_into_an_empty_cache_and_can_be_switched_off(tmp_path: Path) -> None:
    assert _available_in_subprocess({"XDG_CACHE_HOME": str(tmp_path)}) == "True"
    built = list((tmp_path / "pagedserve" / "kernels").glob("paged_attention_cpu-*.so"))
    assert len(built) == 1
    assert _available_in_subprocess({"XDG_CACHE_HOME": str(tmp_path),
                                     "PAGEDSERVE_CPU_KERNELS": "0"}) == "False"
