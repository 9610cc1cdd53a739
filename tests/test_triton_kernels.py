"""The Triton kernels against the torch references and dense float64 attention.

They run on CUDA where a GPU is present, else in Triton's interpreter (``TRITON_INTERPRET=1``,
set by ``pagedserve.kernels.dispatch`` before the kernels are imported); shapes stay small for the
interpreter. Inputs are fresh random values and outputs are poisoned with NaN first, so an
element a kernel fails to write fails the comparison.
"""

from __future__ import annotations

import math
import random
from dataclasses import dataclass
from types import SimpleNamespace
from typing import Any

import pytest
import torch

from pagedserve.kernels import dispatch, rotary
from pagedserve.kernels.attention import AttentionMetadata, paged_attention
from pagedserve.kernels.norm import rms_norm

DEVICE = torch.device("cuda" if torch.cuda.is_available() else "cpu")
TOLERANCE = {torch.float32: 1e-5, torch.bfloat16: 1e-2, torch.float16: 1e-2}
attention_kernels = dispatch.triton_module("triton_attention", DEVICE)
cache_kernels = dispatch.triton_module("triton_cache", DEVICE)
norm_kernels = dispatch.triton_module("triton_norm", DEVICE)


def _relative_error(got: torch.Tensor, expected: torch.Tensor) -> float:
    return float((got.double() - expected.double()).abs().max() / expected.double().abs().max())


@dataclass
class Batch:
    """A flattened batch over a random paged cache, as the runner builds it."""

    q: torch.Tensor
    k_cache: torch.Tensor
    v_cache: torch.Tensor
    tables: list[list[int]]
    query_lens: list[int]
    seq_lens: list[int]

    @property
    def block_tables(self) -> torch.Tensor:
        width = max(len(t) for t in self.tables)
        return torch.tensor([t + [0] * (width - len(t)) for t in self.tables], device=DEVICE)

    def slots(self, i: int, positions: range) -> torch.Tensor:
        bs = self.k_cache.shape[1]
        return torch.tensor([self.tables[i][p // bs] * bs + p % bs for p in positions],
                            device=DEVICE)


def make_batch(shapes: list[tuple[int, int]], *, heads: int, kv_heads: int, head_dim: int,
               block_size: int, dtype: torch.dtype, shared_blocks: int = 0,
               seed: int = 0) -> Batch:
    """``shapes`` are (cached context, new tokens) per sequence. Blocks come shuffled from the
    pool (non-contiguous tables); with ``shared_blocks`` the second sequence starts with the
    first one's leading blocks, as a fork or a prefix-cache hit leaves them."""
    gen = torch.Generator().manual_seed(seed)
    need = sum(math.ceil((c + n) / block_size) for c, n in shapes)
    num_blocks = need + 3
    k_cache = torch.randn(num_blocks, block_size, kv_heads, head_dim, generator=gen)
    v_cache = torch.randn(num_blocks, block_size, kv_heads, head_dim, generator=gen)
    pool = list(range(1, num_blocks))
    random.Random(seed).shuffle(pool)
    tables: list[list[int]] = []
    for i, (context, new) in enumerate(shapes):
        count = math.ceil((context + new) / block_size)
        table = tables[0][:shared_blocks] if i == 1 and shared_blocks else []
        table = table + [pool.pop() for _ in range(count - len(table))]
        tables.append(table)
    q = torch.randn(sum(n for _, n in shapes), heads, head_dim, generator=gen)
    return Batch(q.to(DEVICE, dtype), k_cache.to(DEVICE, dtype), v_cache.to(DEVICE, dtype),
                 tables, [n for _, n in shapes], [c + n for c, n in shapes])


def dense_reference(batch: Batch, scale: float) -> torch.Tensor:
    """Causal attention of each sequence in float64 over its gathered keys and values."""
    kv_heads, head_dim = batch.k_cache.shape[2:]
    group = batch.q.shape[1] // kv_heads
    flat_k = batch.k_cache.reshape(-1, kv_heads, head_dim).double()
    flat_v = batch.v_cache.reshape(-1, kv_heads, head_dim).double()
    outs, start = [], 0
    for i, (n, length) in enumerate(zip(batch.query_lens, batch.seq_lens)):
        slots = batch.slots(i, range(length))
        keys = flat_k[slots].repeat_interleave(group, dim=1)
        values = flat_v[slots].repeat_interleave(group, dim=1)
        scores = torch.einsum("qhd,khd->hqk", batch.q[start: start + n].double(), keys) * scale
        positions = torch.arange(length - n, length, device=DEVICE)[:, None]
        hidden = torch.arange(length, device=DEVICE)[None, :] > positions
        outs.append(torch.einsum("hqk,khd->qhd",
                                 scores.masked_fill(hidden, float("-inf")).softmax(-1), values))
        start += n
    return torch.cat(outs)


def torch_reference(batch: Batch, scale: float, **bias: Any) -> torch.Tensor:
    """``pagedserve.kernels.attention.paged_attention`` on its torch path (decodes must come
    first)."""
    num_decodes = 0
    while num_decodes < len(batch.query_lens) and batch.query_lens[num_decodes] == 1:
        num_decodes += 1
    meta = AttentionMetadata(slot_mapping=torch.zeros(0, dtype=torch.long, device=DEVICE),
                             block_tables=batch.block_tables, query_lens=batch.query_lens,
                             seq_lens=batch.seq_lens, num_decodes=num_decodes,
                             block_size=batch.k_cache.shape[1], backend="torch")
    slots = torch.cat([batch.slots(i, range(length - n, length)) for i, (n, length)
                       in enumerate(zip(batch.query_lens, batch.seq_lens))])
    kv = batch.k_cache.shape[2:]
    k = batch.k_cache.reshape(-1, *kv)[slots]
    v = batch.v_cache.reshape(-1, *kv)[slots]
    return paged_attention(batch.q, k, v, batch.k_cache, batch.v_cache, meta, scale, **bias)


def triton_attention(batch: Batch, scale: float, num_segments: int | None = None,
                     **bias: Any) -> torch.Tensor:
    out = torch.full_like(batch.q, float("nan"))
    starts = [0]
    for n in batch.query_lens:
        starts.append(starts[-1] + n)
    attention_kernels.paged_attention(
        batch.q, batch.k_cache, batch.v_cache, batch.block_tables,
        torch.tensor(batch.seq_lens, dtype=torch.int32, device=DEVICE),
        torch.tensor(starts, dtype=torch.int32, device=DEVICE), max(batch.query_lens),
        max(batch.seq_lens), scale, out, num_segments=num_segments, **bias)
    return out


def check_attention(batch: Batch, num_segments: int | None = None) -> None:
    scale = batch.q.shape[2] ** -0.5
    got = triton_attention(batch, scale, num_segments)
    tolerance = TOLERANCE[batch.q.dtype]
    assert _relative_error(got, dense_reference(batch, scale)) < tolerance
    assert _relative_error(got, torch_reference(batch, scale)) < tolerance


# Decodes first (contexts ending mid-block, on a block boundary, one token long), then a chunk
# over a context ending mid-block, a fresh prompt, a one-token prompt and a chunk ending on a
# block boundary.
MIXED = [(40, 1), (31, 1), (0, 1), (15, 1), (21, 9), (0, 13), (0, 1), (16, 16)]


@pytest.mark.parametrize(("heads", "kv_heads", "block_size"),
                         [(4, 4, 16), (6, 2, 32), (8, 2, 16), (8, 1, 32)])
def test_mixed_batch_over_gqa_ratios(heads: int, kv_heads: int, block_size: int) -> None:
    """Ragged decodes and prefills in one launch, GQA ratios 1, 3, 4 and 8, shared blocks."""
    check_attention(make_batch(MIXED, heads=heads, kv_heads=kv_heads, head_dim=64,
                               block_size=block_size, dtype=torch.float32, shared_blocks=1,
                               seed=heads * 10 + block_size))


@pytest.mark.parametrize("num_segments", [1, 3])
def test_split_kv_decodes(num_segments: int) -> None:
    """Decode-only batches with the context split over segments and merged (flash decoding);
    more segments than some sequences have tiles leaves segments empty."""
    batch = make_batch([(200, 1), (150, 1), (0, 1), (63, 1), (64, 1)], heads=8, kv_heads=2,
                       head_dim=64, block_size=16, dtype=torch.float32, shared_blocks=4,
                       seed=7)
    check_attention(batch, num_segments)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("num_segments", [1, 2])
def test_half_precision_caches(dtype: torch.dtype, num_segments: int) -> None:
    decodes = [(70, 1), (17, 1), (33, 1)]
    check_attention(make_batch(decodes, heads=4, kv_heads=1, head_dim=64, block_size=32,
                               dtype=dtype, seed=3), num_segments)
    check_attention(make_batch(MIXED[3:6], heads=4, kv_heads=1, head_dim=64, block_size=32,
                               dtype=dtype, seed=4))


@pytest.mark.parametrize("cache_dtype", [torch.bfloat16, torch.float16])
def test_fp32_queries_over_a_narrow_cache(cache_dtype: torch.dtype) -> None:
    """``kv_cache_dtype``: fp32 queries over a 16-bit cache attend over its values as stored,
    to fp32's tolerance (the probabilities are not rounded to the cache's type)."""
    batch = make_batch(MIXED, heads=6, kv_heads=2, head_dim=64, block_size=16,
                       dtype=torch.float32, seed=11)
    batch.k_cache, batch.v_cache = batch.k_cache.to(cache_dtype), batch.v_cache.to(cache_dtype)
    check_attention(batch)
    check_attention(batch, num_segments=2)


@pytest.mark.parametrize("head_dim", [80, 96, 128, 256])
def test_head_sizes(head_dim: int) -> None:
    """Head sizes that are not powers of two are padded to one and masked."""
    shapes = [(18, 1), (5, 4)]
    check_attention(make_batch(shapes, heads=2, kv_heads=1, head_dim=head_dim, block_size=16,
                               dtype=torch.float32, seed=head_dim))
    check_attention(make_batch(shapes, heads=2, kv_heads=1, head_dim=head_dim, block_size=16,
                               dtype=torch.bfloat16, seed=head_dim + 1))


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
@pytest.mark.parametrize("head_dim", [64, 80])
def test_rotary_write_kv(dtype: torch.dtype, head_dim: int) -> None:
    """q and k rotated in place, k and v stored at their slots, negative slots skipped and
    every other cache element left as it was."""
    gen = torch.Generator().manual_seed(head_dim)
    heads, kv_heads, tokens, block_size, num_blocks = 4, 2, 7, 16, 3
    qkv = torch.randn(tokens, (heads + 2 * kv_heads) * head_dim, generator=gen)
    angles = torch.rand(tokens, head_dim // 2, generator=gen) * 10
    cos = torch.cat([angles.cos()] * 2, dim=-1)
    sin = torch.cat([angles.sin()] * 2, dim=-1)
    slots = torch.randperm(num_blocks * block_size, generator=gen)[:tokens]
    slots[[1, 4]] = -1
    k_cache = torch.randn(num_blocks, block_size, kv_heads, head_dim, generator=gen)
    v_cache = torch.randn(num_blocks, block_size, kv_heads, head_dim, generator=gen)
    qkv, cos, sin, slots, k_cache, v_cache = (t.to(DEVICE) for t in
                                              (qkv, cos, sin, slots, k_cache, v_cache))
    qkv, cos, sin, k_cache, v_cache = (t.to(dtype) for t in (qkv, cos, sin, k_cache, v_cache))
    q_size, kv_size = heads * head_dim, kv_heads * head_dim
    q_ref = rotary.apply_rotary(qkv[:, :q_size].reshape(tokens, heads, head_dim), cos, sin)
    k_ref = rotary.apply_rotary(qkv[:, q_size: q_size + kv_size]
                                .reshape(tokens, kv_heads, head_dim), cos, sin)
    v_ref = qkv[:, q_size + kv_size:].reshape(tokens, kv_heads, head_dim).clone()
    k_cache_ref, v_cache_ref = k_cache.clone(), v_cache.clone()
    kept = slots >= 0
    k_cache_ref.view(-1, kv_heads, head_dim)[slots[kept]] = k_ref[kept]
    v_cache_ref.view(-1, kv_heads, head_dim)[slots[kept]] = v_ref[kept]
    q, k, v = rotary.rotary_write_kv(qkv, cos, sin, k_cache, v_cache, slots, heads, kv_heads,
                                     backend="triton")
    tolerance = TOLERANCE[dtype]
    assert q.data_ptr() == qkv.data_ptr()  # views of the rotated qkv
    for got, expected in ((q, q_ref), (k, k_ref), (k_cache, k_cache_ref)):
        assert _relative_error(got, expected) < tolerance
    assert torch.equal(v, v_ref)
    assert torch.equal(v_cache, v_cache_ref)


def test_write_kv_skips_negative_slots() -> None:
    gen = torch.Generator().manual_seed(5)
    k, v = torch.randn(2, 5, 3, 64, generator=gen).to(DEVICE)
    k_cache, v_cache = torch.randn(2, 4, 16, 3, 64, generator=gen).to(DEVICE)
    slots = torch.tensor([17, -1, 0, 63, -5], device=DEVICE)
    expected_k, expected_v = k_cache.clone(), v_cache.clone()
    for i, slot in enumerate(slots.tolist()):
        if slot >= 0:
            expected_k.view(-1, 3, 64)[slot] = k[i]
            expected_v.view(-1, 3, 64)[slot] = v[i]
    cache_kernels.write_kv(k, v, k_cache, v_cache, slots)
    assert torch.equal(k_cache, expected_k)
    assert torch.equal(v_cache, expected_v)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("residual", [True, False])
def test_add_rms_norm(dtype: torch.dtype, residual: bool) -> None:
    gen = torch.Generator().manual_seed(int(residual))
    x, delta = (torch.randn(5, 96, generator=gen).to(DEVICE, dtype) for _ in range(2))
    weight = torch.randn(96, generator=gen).to(DEVICE, dtype)
    expected_x = x + delta if residual else x.clone()
    expected = rms_norm(expected_x, weight, 1e-5)
    got = norm_kernels.add_rms_norm(x, delta if residual else None, weight, 1e-5)
    # The residual stream, in place (the interpreter rounds to bf16 toward zero, torch to
    # nearest).
    assert _relative_error(x, expected_x) < TOLERANCE[dtype]
    assert got.dtype == expected.dtype
    assert _relative_error(got, expected) < TOLERANCE[dtype]


def test_launch_config_splits_only_long_decodes_that_underfill_the_gpu() -> None:
    config = attention_kernels.launch_config
    # One long decode on a 132-SM GPU: as many segments as allowed.
    assert config(4, 128, 1, 1, 8, 32768, 132).num_segments == attention_kernels.MAX_SEGMENTS
    # Short contexts, or a batch with prefills, or enough sequences: no split.
    assert config(4, 128, 1, 1, 8, 200, 132).num_segments == 1
    assert config(4, 128, 7, 1, 8, 32768, 132).num_segments == 1
    assert config(4, 128, 1, 256, 8, 2048, 132).num_segments == 1
    # A sliding window bounds the keys a decode reads, whatever its context.
    assert config(4, 128, 1, 1, 8, 32768, 132, sliding_window=512).num_segments == 2
    # Query rows: a tensor-core tile for decodes (the whole group when larger), 64 otherwise.
    assert (config(8, 128, 1, 64, 8, 2048, 132).block_m, config(32, 64, 1, 1, 1, 64, 1).block_m,
            config(3, 64, 9, 2, 2, 64, 1).block_q) == (16, 32, 21)


@pytest.mark.parametrize("num_segments", [1, 2])
def test_sliding_window_and_alibi(num_segments: int) -> None:
    """Mistral's window and Falcon's ALiBi slopes, as the torch path applies them."""
    shapes = [(70, 1), (40, 1)] if num_segments > 1 else [(70, 1), (21, 9), (0, 13)]
    batch = make_batch(shapes, heads=4, kv_heads=2, head_dim=64, block_size=16,
                       dtype=torch.float32, seed=num_segments)
    scale = 64 ** -0.5
    slopes = torch.tensor([0.5, 0.25, 0.125, 0.0625], device=DEVICE)
    for bias in ({"sliding_window": 20}, {"alibi_slopes": slopes},
                 {"sliding_window": 5, "alibi_slopes": slopes}):
        got = triton_attention(batch, scale, num_segments, **bias)
        assert _relative_error(got, torch_reference(batch, scale, **bias)) < 1e-5


@pytest.mark.parametrize("num_segments", [1, 3])
def test_sliding_window_skips_released_blocks(num_segments: int) -> None:
    """Blocks wholly before the window are released and their table entries become the null
    block: the kernel must not read them. The null block is poisoned with NaN here, so a read
    shows; contexts span several key tiles before the window, and a short one has none."""
    window = 20
    batch = make_batch([(140, 1), (45, 1), (6, 1)], heads=4, kv_heads=2, head_dim=64,
                       block_size=16, dtype=torch.float32, seed=5)
    scale = 64 ** -0.5
    expected = torch_reference(batch, scale, sliding_window=window)
    bs = batch.k_cache.shape[1]
    for table, length in zip(batch.tables, batch.seq_lens):
        released = max(length - window, 0) // bs
        table[:released] = [0] * released
    batch.k_cache[0] = float("nan")
    batch.v_cache[0] = float("nan")
    got = triton_attention(batch, scale, num_segments, sliding_window=window)
    assert _relative_error(got, expected) < 1e-5


def test_to_device_pins_host_memory_before_a_cuda_copy(monkeypatch: pytest.MonkeyPatch) -> None:
    """A non-blocking copy from pageable memory may still wait for the stream: the host tensor
    is pinned first, and only when the copy goes to a GPU."""
    calls: list[str] = []
    real_to = torch.Tensor.to

    def pin_memory(self: torch.Tensor) -> torch.Tensor:
        calls.append("pin")
        return self

    def to(self: torch.Tensor, *args: Any, **kwargs: Any) -> torch.Tensor:
        if args and isinstance(args[0], torch.device) and args[0].type == "cuda":
            calls.append(f"copy non_blocking={kwargs.get('non_blocking')}")
            return self
        return real_to(self, *args, **kwargs)

    monkeypatch.setattr(torch.Tensor, "pin_memory", pin_memory)
    monkeypatch.setattr(torch.Tensor, "to", to)
    assert dispatch.to_device([1, 2], torch.int32, torch.device("cpu")).tolist() == [1, 2]
    assert calls == []
    dispatch.to_device([1, 2], torch.int32, torch.device("cuda", 1))
    assert calls == ["pin", "copy non_blocking=True"]


def test_launches_on_a_gpu_make_the_tensors_device_current() -> None:
    """Triton launches on the thread's current CUDA device, not the tensors': on ``cuda:1``
    the launch must switch to it; on a CPU there is nothing to switch."""
    on_gpu = SimpleNamespace(device=torch.device("cuda", 1))  # no GPU needed to ask
    ctx = dispatch.on_device(on_gpu)  # type: ignore[arg-type]
    assert isinstance(ctx, torch.cuda.device) and ctx.idx == 1
    assert not isinstance(dispatch.on_device(torch.zeros(1)), torch.cuda.device)

