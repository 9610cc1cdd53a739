"""Paged attention in the Triton language: the GPU path behind ``paged_attention``.

One kernel serves the whole flattened batch, as vLLM's unified Triton attention does: the query
tokens of every sequence (a prefill chunk, the suffix after a prefix-cache hit, one decode
token) are cut into blocks of ``BLOCK_Q`` consecutive tokens of one sequence, and a program
attends one such block for one KV head, causally, over the sequence's cached context read
through its block table. The query heads sharing that KV head are packed into the program's
rows (``BLOCK_M = BLOCK_Q * group``), so each K/V tile is loaded once for all of them. Variable
lengths are packed by the cumulative offsets ``query_start_loc``; a program finds its sequence by
binary search, so no per-step index tables are built on the host.

When the batch holds only decodes and too few (sequence, KV head) pairs to fill the GPU, the
context is split into segments attended by separate programs (flash decoding); each writes an
unnormalised partial output with its running max and sum, and a second kernel merges them.
Scores, softmax and accumulation are fp32 whatever the cache dtype; exponentials are base 2
with the scale folded in.

This module imports ``triton``: it is only imported through :mod:`pagedserve.kernels.dispatch`,
which sets ``TRITON_INTERPRET=1`` first when the tensors are on a CPU.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import triton
import triton.language as tl

from pagedserve.kernels.dispatch import on_device

_LOG2_E = 1.4426950408889634
# Upper bound on KV segments per sequence: more would make the merge cost more than it saves.
MAX_SEGMENTS = 16
# Split only contexts long enough to give every segment this many keys.
_MIN_KEYS_PER_SEGMENT = 256
# Programs wanted per streaming multiprocessor before splitting stops paying.
_PROGRAMS_PER_SM = 4


_LOG2E: tl.constexpr = tl.constexpr(_LOG2_E)


@triton.jit
def _paged_attention_kernel(
    out_ptr, part_out_ptr, part_max_ptr, part_sum_ptr,
    q_ptr, k_cache_ptr, v_cache_ptr, block_tables_ptr, seq_lens_ptr, query_start_loc_ptr,
    alibi_ptr, scale_log2, num_seqs,
    stride_q_t, stride_q_h, stride_o_t, stride_o_h,
    stride_k_b, stride_k_s, stride_k_h, stride_v_b, stride_v_s, stride_v_h, stride_bt,
    NUM_HEADS: tl.constexpr, GROUP: tl.constexpr, HEAD_DIM: tl.constexpr,
    HEAD_PAD: tl.constexpr, BLOCK_SIZE: tl.constexpr, TILE_N: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_Q: tl.constexpr, NUM_SEGMENTS: tl.constexpr,
    DOT_FP32: tl.constexpr, SLIDING_WINDOW: tl.constexpr, HAS_ALIBI: tl.constexpr,
):
    q_block_global = tl.program_id(0)
    kv_head = tl.program_id(1)
    segment = tl.program_id(2)
    # The sequence holding this query block: sequence i's blocks start at
    # query_start_loc[i] // BLOCK_Q + i, increasing in i; binary search for the last start
    # <= q_block_global. (Inline: a helper call costs much in the interpreter.)
    lo: tl.int32 = 0  # type: ignore[valid-type]
    hi: tl.int32 = num_seqs  # type: ignore[valid-type]
    while lo < hi:
        mid = (lo + hi) // 2
        if tl.load(query_start_loc_ptr + mid) // BLOCK_Q + mid <= q_block_global:
            lo = mid + 1
        else:
            hi = mid
    seq = lo - 1
    q_start = tl.load(query_start_loc_ptr + seq)
    q_len = tl.load(query_start_loc_ptr + seq + 1) - q_start
    q_block = q_block_global - (q_start // BLOCK_Q + seq)
    if q_block * BLOCK_Q >= q_len:
        return  # the grid is sized for the worst case of block boundaries
    seq_len = tl.load(seq_lens_ptr + seq)
    context = seq_len - q_len  # keys cached before this step's tokens

    offs_m = tl.arange(0, BLOCK_M)
    offs_d = tl.arange(0, HEAD_PAD)
    offs_n = tl.arange(0, TILE_N)
    q_pos = q_block * BLOCK_Q + offs_m // GROUP
    head = kv_head * GROUP + offs_m % GROUP
    row_ok = (q_pos < q_len) & (offs_m < BLOCK_Q * GROUP)
    d_ok = offs_d < HEAD_DIM
    q_rows = (q_start + q_pos).to(tl.int64) * stride_q_t + head * stride_q_h
    q = tl.load(q_ptr + q_rows[:, None] + offs_d[None, :],
                mask=row_ok[:, None] & d_ok[None, :], other=0.0)
    if DOT_FP32:
        q = q.to(tl.float32)
    # Row r sees keys at positions <= context + q_pos[r]; the block needs keys < kv_end.
    last_pos = context + q_pos
    kv_end = context + tl.minimum(q_block * BLOCK_Q + BLOCK_Q, q_len)
    num_tiles = (kv_end + TILE_N - 1) // TILE_N
    # Keys before the window of the block's first row are seen by no row: their blocks may
    # already be released (null), so their tiles are skipped and the rest never loaded.
    kv_start = 0
    if SLIDING_WINDOW > 0:
        kv_start = tl.maximum(context + q_block * BLOCK_Q - SLIDING_WINDOW + 1, 0)
    first_tile = kv_start // TILE_N
    if NUM_SEGMENTS == 1:
        tile_lo = first_tile
        tile_hi = num_tiles
    else:
        per_segment = (num_tiles - first_tile + NUM_SEGMENTS - 1) // NUM_SEGMENTS
        tile_lo = first_tile + segment * per_segment
        tile_hi = tl.minimum(tile_lo + per_segment, num_tiles)

    if HAS_ALIBI:  # slope * (key - query position), in the log2 domain of the scores
        slope = tl.load(alibi_ptr + head, mask=row_ok, other=0.0).to(tl.float32) * _LOG2E
    running_max = tl.full([BLOCK_M], float("-inf"), dtype=tl.float32)
    running_sum = tl.zeros([BLOCK_M], dtype=tl.float32)
    acc = tl.zeros([BLOCK_M, HEAD_PAD], dtype=tl.float32)
    table = block_tables_ptr + tl.cast(seq, tl.int64) * stride_bt
    for tile in range(tile_lo, tile_hi):
        key = tile * TILE_N + offs_n
        key_ok = (key < kv_end) & (key >= kv_start)
        block = tl.load(table + key // BLOCK_SIZE, mask=key_ok, other=0).to(tl.int64)
        in_block = key % BLOCK_SIZE
        k_rows = block * stride_k_b + in_block * stride_k_s + kv_head * stride_k_h
        k = tl.load(k_cache_ptr + k_rows[None, :] + offs_d[:, None],
                    mask=key_ok[None, :] & d_ok[:, None], other=0.0)
        if DOT_FP32:
            k = k.to(tl.float32)
        # fp32 operands in full precision (not TF32); the precision does not apply to others.
        scores = tl.dot(q, k, input_precision="ieee") * scale_log2
        visible = (key[None, :] <= last_pos[:, None]) & key_ok[None, :]
        if SLIDING_WINDOW > 0:
            visible = visible & (key[None, :] > last_pos[:, None] - SLIDING_WINDOW)
        if HAS_ALIBI:
            scores += slope[:, None] * (key[None, :] - last_pos[:, None]).to(tl.float32)
        scores = tl.where(visible, scores, float("-inf"))
        new_max = tl.maximum(running_max, tl.max(scores, axis=1))
        # A row with nothing visible yet keeps -inf: exponentiate against 0 so it stays 0.
        safe_max = tl.where(new_max == float("-inf"), 0.0, new_max)
        probs = tl.math.exp2(scores - safe_max[:, None])
        alpha = tl.math.exp2(running_max - safe_max)
        running_sum = running_sum * alpha + tl.sum(probs, axis=1)
        v_rows = block * stride_v_b + in_block * stride_v_s + kv_head * stride_v_h
        v = tl.load(v_cache_ptr + v_rows[:, None] + offs_d[None, :],
                    mask=key_ok[:, None] & d_ok[None, :], other=0.0)
        if DOT_FP32:  # fp32 probabilities, whatever the cache holds
            v = v.to(tl.float32)
        else:
            probs = probs.to(v.dtype)
        acc = acc * alpha[:, None] + tl.dot(probs, v, input_precision="ieee")
        running_max = new_max

    tokens = (q_start + q_pos).to(tl.int64)
    store_ok = row_ok[:, None] & d_ok[None, :]
    if NUM_SEGMENTS == 1:
        out = acc / running_sum[:, None]
        o_rows = tokens * stride_o_t + head * stride_o_h
        tl.store(out_ptr + o_rows[:, None] + offs_d[None, :],
                 out.to(out_ptr.dtype.element_ty), mask=store_ok)
    else:
        part = (tokens * NUM_HEADS + head) * NUM_SEGMENTS + segment
        tl.store(part_out_ptr + part[:, None] * HEAD_PAD + offs_d[None, :], acc, mask=store_ok)
        tl.store(part_max_ptr + part, running_max, mask=row_ok)
        tl.store(part_sum_ptr + part, running_sum, mask=row_ok)


@triton.jit
def _merge_segments_kernel(
    out_ptr, part_out_ptr, part_max_ptr, part_sum_ptr, stride_o_t, stride_o_h,
    NUM_HEADS: tl.constexpr, HEAD_DIM: tl.constexpr, HEAD_PAD: tl.constexpr,
    NUM_SEGMENTS: tl.constexpr, SEGMENTS_PAD: tl.constexpr,
):
    token = tl.program_id(0).to(tl.int64)
    head = tl.program_id(1)
    offs_s = tl.arange(0, SEGMENTS_PAD)
    offs_d = tl.arange(0, HEAD_PAD)
    s_ok = offs_s < NUM_SEGMENTS
    part = (token * NUM_HEADS + head) * NUM_SEGMENTS + offs_s
    seg_max = tl.load(part_max_ptr + part, mask=s_ok, other=float("-inf"))
    seg_sum = tl.load(part_sum_ptr + part, mask=s_ok, other=0.0)
    # The segment holding a query's own key has a finite max, so the overall max is finite.
    weight = tl.math.exp2(seg_max - tl.max(seg_max, axis=0))
    total = tl.sum(seg_sum * weight, axis=0)
    acc = tl.load(part_out_ptr + part[:, None] * HEAD_PAD + offs_d[None, :],
                  mask=s_ok[:, None], other=0.0)
    out = tl.sum(acc * weight[:, None], axis=0) / total
    tl.store(out_ptr + token * stride_o_t + head * stride_o_h + offs_d,
             out.to(out_ptr.dtype.element_ty), mask=offs_d < HEAD_DIM)


@dataclass(frozen=True)
class LaunchConfig:
    """Tile sizes and launch settings of one call."""

    block_m: int  # query rows per program: BLOCK_Q tokens times the GQA group
    block_q: int
    tile_n: int  # keys per inner iteration
    num_segments: int
    num_warps: int
    num_stages: int


def launch_config(group: int, head_dim: int, max_query_len: int, num_seqs: int,
                  num_kv_heads: int, max_seq_len: int, num_sms: int,
                  num_segments: int | None = None,
                  sliding_window: int | None = None) -> LaunchConfig:
    """Tiles for the head size and the batch's shape.

    Decode-only batches take the fewest query rows that fill a tensor-core tile (16, or the GQA
    group when larger) and may split the context (a decode under ``sliding_window`` reads that
    many keys at most); batches with prefills take 64 rows, where the K/V tile is reused across
    many queries. ``num_segments`` forces the split (tests).
    """
    head_pad = triton.next_power_of_2(head_dim)
    decode_only = max_query_len == 1
    block_m = max(16 if decode_only else 64, triton.next_power_of_2(group))
    tile_n = 32 if head_pad > 128 else 64
    if num_segments is None:
        num_segments = 1
        programs = num_seqs * num_kv_heads
        if decode_only and programs < _PROGRAMS_PER_SM * num_sms:
            wanted = triton.cdiv(_PROGRAMS_PER_SM * num_sms, programs)
            keys = min(max_seq_len, sliding_window) if sliding_window else max_seq_len
            num_segments = max(1, min(MAX_SEGMENTS, wanted,
                                      keys // _MIN_KEYS_PER_SEGMENT))
    big_tiles = block_m * head_pad >= 64 * 256
    return LaunchConfig(block_m=block_m, block_q=max(1, block_m // group), tile_n=tile_n,
                        num_segments=num_segments, num_warps=8 if big_tiles else 4,
                        num_stages=2 if big_tiles else 3)


def _num_sms(device: torch.device) -> int:
    if device.type == "cuda":
        return torch.cuda.get_device_properties(device).multi_processor_count
    return 1  # the interpreter runs programs one after another


def paged_attention(q: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor,
                    block_tables: torch.Tensor, seq_lens: torch.Tensor,
                    query_start_loc: torch.Tensor, max_query_len: int, max_seq_len: int,
                    scale: float, out: torch.Tensor, num_segments: int | None = None,
                    sliding_window: int | None = None,
                    alibi_slopes: torch.Tensor | None = None) -> None:
    """Writes into ``out`` the causal attention of the step's query tokens over their contexts.

    ``q``/``out`` ``[num_tokens, num_heads, head_dim]`` (heads contiguous); caches
    ``[num_blocks, block_size, num_kv_heads, head_dim]``; ``block_tables`` ``[num_seqs, width]``;
    ``seq_lens`` ``[num_seqs]`` (context plus new tokens) and ``query_start_loc``
    ``[num_seqs + 1]`` (cumulative query counts) int32. The new tokens' K/V must already be in
    the cache. ``max_query_len`` and ``max_seq_len`` are the batch's, known on the host.
    With ``sliding_window`` W a query sees the keys of its last W positions only;
    ``alibi_slopes`` ``[num_heads]`` adds ``slope * (key position - query position)`` to the
    scaled scores.
    """
    num_tokens, num_heads, head_dim = q.shape
    num_kv_heads, block_size = k_cache.shape[2], k_cache.shape[1]
    if num_heads % num_kv_heads or k_cache.shape[3] != head_dim or v_cache.shape != k_cache.shape:
        raise ValueError(f"q {tuple(q.shape)} does not fit the caches {tuple(k_cache.shape)}")
    if q.stride(2) != 1 or out.stride(2) != 1 or k_cache.stride(3) != 1 or \
            v_cache.stride(3) != 1 or block_tables.stride(1) != 1:
        raise ValueError("head dimensions and block table rows must be contiguous")
    num_seqs = seq_lens.shape[0]
    group = num_heads // num_kv_heads
    cfg = launch_config(group, head_dim, max_query_len, num_seqs, num_kv_heads, max_seq_len,
                        _num_sms(q.device), num_segments, sliding_window)
    head_pad = triton.next_power_of_2(head_dim)
    grid = (num_tokens // cfg.block_q + num_seqs, num_kv_heads, cfg.num_segments)
    if cfg.num_segments > 1:
        part_out = torch.empty(num_tokens, num_heads, cfg.num_segments, head_pad,
                               dtype=torch.float32, device=q.device)
        part_max = torch.empty(num_tokens, num_heads, cfg.num_segments, dtype=torch.float32,
                               device=q.device)
        part_sum = torch.empty_like(part_max)
    else:  # unused by the kernel in this mode
        part_out = part_max = part_sum = out
    with on_device(q):
        _paged_attention_kernel[grid](
            out, part_out, part_max, part_sum, q, k_cache, v_cache, block_tables, seq_lens,
            query_start_loc, alibi_slopes if alibi_slopes is not None else seq_lens,
            scale * _LOG2_E, num_seqs,
            q.stride(0), q.stride(1), out.stride(0), out.stride(1),
            k_cache.stride(0), k_cache.stride(1), k_cache.stride(2),
            v_cache.stride(0), v_cache.stride(1), v_cache.stride(2), block_tables.stride(0),
            NUM_HEADS=num_heads, GROUP=group, HEAD_DIM=head_dim, HEAD_PAD=head_pad,
            BLOCK_SIZE=block_size, TILE_N=cfg.tile_n, BLOCK_M=cfg.block_m, BLOCK_Q=cfg.block_q,
            NUM_SEGMENTS=cfg.num_segments,
            # The interpreter's bf16 dot is wrong: it takes fp32 operands there (rounded as the
            # GPU's would be).
            DOT_FP32=q.dtype == torch.float32 or q.device.type != "cuda",
            SLIDING_WINDOW=sliding_window or 0, HAS_ALIBI=alibi_slopes is not None,
            num_warps=cfg.num_warps, num_stages=cfg.num_stages)
        if cfg.num_segments > 1:
            _merge_segments_kernel[(num_tokens, num_heads)](
                out, part_out, part_max, part_sum, out.stride(0), out.stride(1),
                NUM_HEADS=num_heads, HEAD_DIM=head_dim, HEAD_PAD=head_pad,
                NUM_SEGMENTS=cfg.num_segments,
                SEGMENTS_PAD=max(2, triton.next_power_of_2(cfg.num_segments)), num_warps=4)
