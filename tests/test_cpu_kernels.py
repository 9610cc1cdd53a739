"""The C kernels of kernels/cpu.py against torch references, and how they are built."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from pagedserve.kernels import cpu
from pagedserve.kernels.attention import write_kv
from pagedserve.kernels.norm import rms_norm
from pagedserve.kernels.rotary import apply_rotary

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
                         [(64, 3, 9, 16), (128, 2, 8, 16), (64, 4, 4, 8), (24, 1, 3, 5),
                          (20, 2, 4, 16)])
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
    with pytest.raises(ValueError, match="shapes"):
        cpu.decode_attention(torch.randn(1, 2, 4), k_cache, k_cache, tables, lens, 1.0,
                             torch.empty(1, 2, 4))
    with pytest.raises(ValueError, match="CPU tensors"):
        cpu.decode_attention(torch.randn(1, 2, 8, device="meta"), k_cache, k_cache, tables,
                             lens, 1.0, out)
    # Bounds are checked before anything is read: a length past the table (also past a column
    # slice of a wider one), a block past the cache, a negative block.
    for bad_tables, bad_lens in ((tables, torch.tensor([5])), (torch.tensor([[4]]), lens),
                                 (torch.tensor([[-1]]), lens),
                                 (torch.tensor([[1, 2]])[:, :1], torch.tensor([5]))):
        with pytest.raises(ValueError, match="block"):
            cpu.decode_attention(torch.randn(1, 2, 8), k_cache, k_cache, bad_tables, bad_lens,
                                 1.0, out)


def _available_in_subprocess(env: dict[str, str]) -> str:
    code = "from pagedserve.kernels import cpu; print(cpu.available())"
    done = subprocess.run([sys.executable, "-c", code], cwd=ROOT, env={**os.environ, **env},
                          capture_output=True, text=True, check=True, timeout=120)
    return done.stdout.strip()


@pytest.mark.slow  # compiles the kernels from scratch
def test_builds_into_an_empty_cache_and_can_be_switched_off(tmp_path: Path) -> None:
    assert _available_in_subprocess({"PAGEDSERVE_CACHE": str(tmp_path)}) == "True"
    built = list((tmp_path / "kernels").glob("pagedserve_cpu-*.so"))
    assert len(built) == 1
    assert _available_in_subprocess({"PAGEDSERVE_CACHE": str(tmp_path),
                                     "PAGEDSERVE_CPU_KERNELS": "0"}) == "False"
    # An unwritable cache (here a file in its place) falls back to a private temporary folder,
    # but not to one that others may write to (they could plant a library there).
    blocked = tmp_path / "not-a-folder"
    blocked.write_text("")
    temp = tmp_path / "tmp"
    temp.mkdir()
    env = {"PAGEDSERVE_CACHE": str(blocked), "TMPDIR": str(temp)}
    assert _available_in_subprocess(env) == "True"
    private = temp / f"pagedserve-kernels-{os.getuid()}"
    assert private.stat().st_mode & 0o777 == 0o700
    for library in private.glob("*.so"):
        library.unlink()
    private.chmod(0o777)
    assert _available_in_subprocess(env) == "False"
    assert not list(private.glob("*.so"))


@pytest.mark.parametrize("with_residual", [False, True])
@pytest.mark.parametrize("rows", [1, 5, 64])
def test_add_rms_norm_matches_torch(with_residual: bool, rows: int) -> None:
    torch.manual_seed(rows)
    x = torch.randn(rows, 576) * 3
    residual = torch.randn(rows, 576) if with_residual else None
    weight = torch.randn(576)
    expected_sum = x + residual if residual is not None else x.clone()
    expected = rms_norm(expected_sum, weight, 1e-5)
    got = cpu.add_rms_norm(x, residual, weight, 1e-5)
    torch.testing.assert_close(x, expected_sum, rtol=0, atol=0)  # the sum is exact
    torch.testing.assert_close(got, expected, rtol=2e-6, atol=1e-6)


def test_rotary_write_kv_matches_torch_exactly() -> None:
    torch.manual_seed(0)
    heads, kv_heads, head_dim, tokens = 9, 3, 64, 37
    qkv = torch.randn(tokens, (heads + 2 * kv_heads) * head_dim + 8)[:, :-8]  # strided rows
    angles = torch.rand(tokens, head_dim // 2) * 100
    cos = torch.cat([angles.cos(), angles.cos()], dim=-1)
    sin = torch.cat([angles.sin(), angles.sin()], dim=-1)
    slots = torch.randperm(40 * 4)[:tokens]
    caches = [torch.zeros(40, 4, kv_heads, head_dim) for _ in range(4)]
    q_ref = apply_rotary(qkv[:, :heads * head_dim].reshape(tokens, heads, head_dim), cos, sin)
    k_ref = apply_rotary(qkv[:, heads * head_dim: (heads + kv_heads) * head_dim]
                         .reshape(tokens, kv_heads, head_dim), cos, sin)
    v_ref = qkv[:, (heads + kv_heads) * head_dim:].reshape(tokens, kv_heads, head_dim).clone()
    write_kv(k_ref, v_ref, caches[0], caches[1], slots)
    cpu.rotary_write_kv(qkv, cos, sin, caches[2], caches[3], slots, heads, kv_heads)
    # No fast math and no FMA contraction: the kernel rounds exactly as the torch ops do.
    assert torch.equal(qkv[:, :heads * head_dim].reshape(tokens, heads, head_dim), q_ref)
    assert torch.equal(caches[2], caches[0])
    assert torch.equal(caches[3], caches[1])


def test_row_kernels_refuse_what_they_cannot_read() -> None:
    with pytest.raises(ValueError, match="residual"):
        cpu.add_rms_norm(torch.randn(4, 8), torch.randn(3, 8), torch.randn(8), 1e-5)
    with pytest.raises(ValueError, match="weight"):
        cpu.add_rms_norm(torch.randn(4, 8), None, torch.randn(7), 1e-5)
    with pytest.raises(ValueError, match="CPU tensors"):
        cpu.add_rms_norm(torch.randn(4, 8), torch.randn(4, 8, device="meta"), torch.randn(8),
                         1e-5)
    with pytest.raises(ValueError, match="separate rows"):
        cpu.add_rms_norm(torch.randn(8).expand(4, 8), None, torch.randn(8), 1e-5)
    cache = torch.zeros(4, 4, 1, 8)
    with pytest.raises(ValueError, match="agree"):
        cpu.rotary_write_kv(torch.randn(2, 40), torch.randn(2, 8), torch.randn(2, 8), cache,
                            cache, torch.tensor([1, 2]), 2, 1)
    with pytest.raises(ValueError, match="slot_mapping"):
        cpu.rotary_write_kv(torch.randn(2, 32), torch.randn(2, 8), torch.randn(2, 8), cache,
                            cache, torch.tensor([1, 2, 3]), 2, 1)
    for slot in (16, -1):  # 4 blocks of 4 slots
        with pytest.raises(ValueError, match="outside the cache"):
            cpu.rotary_write_kv(torch.randn(2, 32), torch.randn(2, 8), torch.randn(2, 8), cache,
                                cache.clone(), torch.tensor([1, slot]), 2, 1)
    assert not cache.any()  # nothing was written


@pytest.mark.parametrize(("rows", "vocab"), [(1, 49152), (5, 1000), (64, 33), (3, 1)])
def test_argmax_logsumexp_matches_torch(rows: int, vocab: int) -> None:
    """The sampler's reductions: the first index of each row's maximum (ties placed on
    purpose, -inf masks included, as min_tokens and grammars leave them) and the row's
    log-normalizer, from rows apart in a wider buffer."""
    torch.manual_seed(rows + vocab)
    x = (torch.randn(rows, vocab + 7) * 4)[:, :vocab]
    if vocab > 3:
        x[0, vocab // 3] = x[0, vocab // 2] = x[0].max() + 1  # a tie: the first one wins
        x[-1, : vocab // 2] = float("-inf")
    tokens, lse = cpu.argmax_logsumexp(x)
    assert tokens.tolist() == x.argmax(dim=-1).tolist()
    torch.testing.assert_close(lse, torch.logsumexp(x, dim=-1), rtol=1e-6, atol=1e-6)
    with pytest.raises(ValueError, match="fp32 rows"):
        cpu.argmax_logsumexp(x.double())
