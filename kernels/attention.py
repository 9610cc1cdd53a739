"""Paged attention: one interface the model calls, implementations behind it.

The KV cache of a layer is a pair of tensors ``[num_blocks, block_size, num_kv_heads, head_dim]``;
token ``p`` of a sequence lives at slot
``block_table[p // block_size] * block_size + p % block_size``.
The cache may hold a narrower dtype than the model computes in (``kv_cache_dtype``): keys and
values are rounded to it when written, and attention reads them as stored, fresh ones included.
Block 0 is the null block: never allocated, kept zero, and used to pad gathers so that padded
positions read finite values (they are masked out of the softmax anyway).

A step's batch is flattened: the query tokens of all sequences are concatenated, sequences with a
single query token (decodes) first. This module holds the torch implementation, which runs
everywhere and is the reference of the kernels behind the same two functions: on CPUs (fp32,
bf16, fp16, and an fp32 model over a bf16 or fp16 cache), decodes are attended in place by the
C kernel of :mod:`pagedserve.kernels.cpu` when it is built (torch ops must first gather each
context into a copy); on CUDA the whole batch goes to
the Triton kernels of :mod:`pagedserve.kernels.triton_attention` and
:mod:`pagedserve.kernels.triton_cache`. :mod:`pagedserve.kernels.dispatch` chooses
(``AttentionMetadata.backend``).
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
import torch.nn.functional as F

from pagedserve.kernels import cpu, dispatch

NULL_BLOCK = 0
# On the torch path decodes are attended in groups of consecutive rows; callers sort decodes by
# context length so that each group is padded only to its own longest context, which keeps the
# gathered K/V small (this path is bound by memory traffic).
DECODE_GROUP_SIZE = 16


# On the torch path a decode group whose sequences all start with the same cached blocks (a
# shared prompt, beams, parallel samples) reads those blocks once for the whole group, not once
# per sequence, when they hold at least this many tokens (cascade attention: two partial
# softmaxes merged by their log-sum-exp). The CPU kernel needs no such split: it reads shared
# blocks in place, where they stay in cache from one sequence to the next (measured faster than
# the torch cascade, 64 decodes over a shared 1024-token prompt).
CASCADE_MIN_SHARED_TOKENS = 32


@dataclass
class DecodeGroup:
    """Decodes attended together by torch ops: rows ``start:end`` of the batch.

    ``slots`` ``[n, max_context]`` (padded with slots of the null block) and ``mask``
    ``[n, 1, 1, max_context]`` (True where a key is real). With ``shared_slots``, the group's
    common prefix is attended once from those slots and ``slots``/``mask`` cover only each
    sequence's own remainder.
    """

    start: int
    end: int
    slots: torch.Tensor
    mask: torch.Tensor
    shared_slots: torch.Tensor | None = None


@dataclass
class AttentionMetadata:
    """Where a step's tokens sit in the paged cache; built once per step, read by every layer.

    ``query_lens[i]`` new tokens of sequence ``i`` are attended over its first ``seq_lens[i]``
    tokens (cached context plus the new ones). The first ``num_decodes`` sequences have one query
    token each; sorting those by ``seq_lens`` makes decode attention cheaper. Tensors live on the
    model's device.
    """

    slot_mapping: torch.Tensor  # [num_tokens] int64: cache slot of each new token
    block_tables: torch.Tensor  # [num_seqs, max_blocks] int64, padded with NULL_BLOCK
    query_lens: list[int]
    seq_lens: list[int]
    num_decodes: int
    block_size: int
    # "auto", "torch", "cpu" or "triton" (pagedserve.kernels.dispatch); the concrete path after
    # init.
    backend: str = "auto"
    # Derived once per step (decode lengths, gather indices, masks), not per layer.
    _decode_lens: torch.Tensor | None = field(default=None, repr=False)
    _decode_in_place: bool = field(default=False, repr=False)
    _decode_groups: list[DecodeGroup] | None = field(default=None, repr=False)
    _prefill_slots: list[torch.Tensor | None] = field(default_factory=list, repr=False)
    # The Triton path's view of the batch: int32 lengths and cumulative query offsets.
    _seq_lens_i32: torch.Tensor | None = field(default=None, repr=False)
    _query_start_loc: torch.Tensor | None = field(default=None, repr=False)

    def __post_init__(self) -> None:
        device = self.block_tables.device
        self.backend = dispatch.resolve(self.backend, device)
        if self.backend == "triton":
            starts = [0]
            for n in self.query_lens:
                starts.append(starts[-1] + n)
            self._seq_lens_i32 = dispatch.to_device(self.seq_lens, torch.int32, device)
            self._query_start_loc = dispatch.to_device(starts, torch.int32, device)
            return
        self._decode_lens = torch.tensor(self.seq_lens[:self.num_decodes], device=device)
        # Whether the decodes may go to the CPU kernel; the dtype is checked when the layer runs.
        self._decode_in_place = self.backend == "cpu"
        for i in range(self.num_decodes, len(self.seq_lens)):
            if self.seq_lens[i] == self.query_lens[i]:
                # Nothing cached before this chunk: attend over the fresh K/V directly.
                self._prefill_slots.append(None)
            else:
                self._prefill_slots.append(_context_slots(
                    self.block_tables[i: i + 1], self.seq_lens[i], self.block_size)[0])

    @property
    def decode_lens(self) -> torch.Tensor:
        """``seq_lens`` of the decodes as an int64 tensor on the device (not on the Triton
        path)."""
        assert self._decode_lens is not None, "the Triton path keeps no decode lengths"
        return self._decode_lens

    def torch_decode_groups(self) -> list[DecodeGroup]:
        """The decodes' groups for the torch path, built on first use and kept for the step."""
        if self._decode_groups is None:
            self._decode_groups = []
            for start in range(0, self.num_decodes, DECODE_GROUP_SIZE):
                end = min(start + DECODE_GROUP_SIZE, self.num_decodes)
                self._decode_groups.append(self._torch_group(start, end))
        return self._decode_groups

    def _torch_group(self, start: int, end: int) -> DecodeGroup:
        """Gather indices and padding mask of rows ``start:end``, cascade split included."""
        device = self.block_tables.device
        bs = self.block_size
        tables = self.block_tables[start:end]
        lens = torch.tensor(self.seq_lens[start:end], device=device)
        shared = _shared_blocks(tables, (int(lens.min()) - 1) // bs) * bs
        if end - start < 2 or shared < CASCADE_MIN_SHARED_TOKENS:
            shared = 0
        slots = _context_slots(tables, int(lens.max()), bs)[:, shared:]
        mask = torch.arange(shared, shared + slots.shape[1], device=device)[None, :] \
            < lens[:, None]
        slots = slots.masked_fill(~mask, NULL_BLOCK * bs)
        shared_slots = _context_slots(tables[:1], shared, bs)[0] if shared else None
        return DecodeGroup(start, end, slots, mask[:, None, None, :], shared_slots)


def _shared_blocks(tables: torch.Tensor, limit: int) -> int:
    """How many leading blocks all rows of ``tables`` have in common, at most ``limit``."""
    same = (tables[:, :limit] == tables[:1, :limit]).all(dim=0)
    return int(same.int().cumprod(0).sum())


def _gather(flat: torch.Tensor, index: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """Rows ``index`` of a flattened cache as ``dtype`` (the query's: a 16-bit cache under
    fp32 activations is widened once gathered)."""
    return flat.index_select(0, index).to(dtype)


def _as_stored(x: torch.Tensor, cache_dtype: torch.dtype, dtype: torch.dtype) -> torch.Tensor:
    """Fresh keys or values as the cache holds them, in the query's ``dtype``: a chunk attends
    over its own tokens as later chunks and decodes will read them, so that splitting a prompt
    changes nothing."""
    return x.to(cache_dtype).to(dtype)


def _context_slots(block_tables: torch.Tensor, length: int, block_size: int) -> torch.Tensor:
    """Slots of positions ``0..length-1`` for each row of ``block_tables``: ``[rows, length]``."""
    positions = torch.arange(length, device=block_tables.device)
    blocks = block_tables[:, positions // block_size]
    return blocks * block_size + positions % block_size


def write_kv(k: torch.Tensor, v: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor,
             slot_mapping: torch.Tensor, backend: str = "auto") -> None:
    """Stores the new tokens' keys and values ``[num_tokens, num_kv_heads, head_dim]``.

    The torch path takes non-negative slots only; the Triton kernel skips negative ones.
    """
    if dispatch.resolve(backend, k.device) == "triton":
        dispatch.triton_module("triton_cache", k.device).write_kv(k, v, k_cache, v_cache,
                                                                  slot_mapping)
        return
    k_cache.view(-1, *k.shape[1:]).index_copy_(0, slot_mapping, k.to(k_cache.dtype))
    v_cache.view(-1, *v.shape[1:]).index_copy_(0, slot_mapping, v.to(v_cache.dtype))


def _partial_attention(query: torch.Tensor, keys: torch.Tensor, values: torch.Tensor,
                       mask: torch.Tensor | None, scale: float
                       ) -> tuple[torch.Tensor, torch.Tensor]:
    """Softmax attention over part of the keys: the output and its log-sum-exp (fp32)."""
    scores = torch.matmul(query, keys.transpose(-1, -2)).float() * scale
    if mask is not None:
        scores = scores.masked_fill(~mask, float("-inf"))
    lse = torch.logsumexp(scores, dim=-1, keepdim=True)
    probs = torch.exp(scores - lse).to(values.dtype)
    return torch.matmul(probs, values).float(), lse


def _cascade_decode(query: torch.Tensor, keys: torch.Tensor, values: torch.Tensor,
                    mask: torch.Tensor, shared_k: torch.Tensor, shared_v: torch.Tensor,
                    scale: float) -> torch.Tensor:
    """Decode attention over a prefix shared by the group plus each sequence's own keys.

    ``query`` ``[n, kv_heads, group, d]``; ``keys``/``values`` ``[n, kv_heads, own, d]``;
    ``shared_k``/``shared_v`` ``[shared, kv_heads, d]``. The shared keys are read once for all
    ``n * group`` query rows of a KV head; the two softmaxes merge exactly by their
    log-sum-exps.
    """
    n, kv_heads, group, d = query.shape
    rows = query.permute(1, 0, 2, 3).reshape(kv_heads, n * group, d)
    out_shared, lse_shared = _partial_attention(rows, shared_k.transpose(0, 1),
                                                shared_v.transpose(0, 1), None, scale)
    out_shared = out_shared.view(kv_heads, n, group, d).permute(1, 0, 2, 3)
    lse_shared = lse_shared.view(kv_heads, n, group, 1).permute(1, 0, 2, 3)
    out_own, lse_own = _partial_attention(query, keys, values, mask, scale)
    top = torch.maximum(lse_shared, lse_own)
    w_shared = torch.exp(lse_shared - top)
    w_own = torch.exp(lse_own - top)
    res = (w_shared * out_shared + w_own * out_own) / (w_shared + w_own)
    return res.to(query.dtype)


def _torch_decode(q: torch.Tensor, flat_k: torch.Tensor, flat_v: torch.Tensor,
                  meta: AttentionMetadata, scale: float, out: torch.Tensor) -> None:
    """Decode attention by torch ops: each group's context gathered, then one SDPA (or a
    cascade) per group."""
    num_heads, head_dim = q.shape[1:]
    num_kv_heads = flat_k.shape[1]
    for group in meta.torch_decode_groups():
        n, ctx = group.slots.shape
        index = group.slots.reshape(-1)
        keys = _gather(flat_k, index, q.dtype).view(n, ctx, num_kv_heads, head_dim)
        values = _gather(flat_v, index, q.dtype).view(n, ctx, num_kv_heads, head_dim)
        keys, values = keys.transpose(1, 2), values.transpose(1, 2)
        # The query heads sharing a KV head become that head's query rows: one small attention
        # per KV head instead of repeating keys and values for every query head.
        query = q[group.start: group.end].reshape(n, num_kv_heads, -1, head_dim)
        if group.shared_slots is None:
            res = F.scaled_dot_product_attention(query, keys, values, attn_mask=group.mask,
                                                 scale=scale)
        else:
            res = _cascade_decode(query, keys, values, group.mask,
                                  _gather(flat_k, group.shared_slots, q.dtype),
                                  _gather(flat_v, group.shared_slots, q.dtype), scale)
        out[group.start: group.end] = res.reshape(n, num_heads, head_dim)


def _position_bias(query_pos: torch.Tensor, key_pos: torch.Tensor, sliding_window: int | None,
                   alibi_slopes: torch.Tensor | None, dtype: torch.dtype) -> torch.Tensor:
    """Additive attention mask ``[heads or 1, queries, keys]``: ``-inf`` where a key lies after
    its query or outside the sliding window, else the ALiBi bias (zero without ALiBi)."""
    rel = key_pos[None, :] - query_pos[:, None]
    hidden = rel > 0
    if sliding_window is not None:
        hidden |= rel <= -sliding_window
    if alibi_slopes is None:
        bias = torch.zeros(1, *rel.shape, device=rel.device)
    else:
        bias = alibi_slopes[:, None, None] * rel[None].float()
    return bias.masked_fill(hidden[None], float("-inf")).to(dtype)


def _torch_decode_biased(q: torch.Tensor, flat_k: torch.Tensor, flat_v: torch.Tensor,
                         meta: AttentionMetadata, scale: float, out: torch.Tensor,
                         sliding_window: int | None, alibi_slopes: torch.Tensor | None) -> None:
    """Decode attention by torch ops under a sliding window or ALiBi: each group of decodes
    gathers its contexts (released blocks read as the null block and are masked)."""
    num_heads, head_dim = q.shape[1:]
    num_kv_heads = flat_k.shape[1]
    for start in range(0, meta.num_decodes, DECODE_GROUP_SIZE):
        end = min(start + DECODE_GROUP_SIZE, meta.num_decodes)
        n, lens = end - start, meta.seq_lens[start:end]
        slots = _context_slots(meta.block_tables[start:end], max(lens), meta.block_size)
        index = slots.reshape(-1)
        ctx = slots.shape[1]
        keys = _gather(flat_k, index, q.dtype).view(n, ctx, num_kv_heads, head_dim)
        values = _gather(flat_v, index, q.dtype).view(n, ctx, num_kv_heads, head_dim)
        keys, values = keys.transpose(1, 2), values.transpose(1, 2)
        query = q[start:end].reshape(n, num_kv_heads, -1, head_dim)
        key_pos = torch.arange(ctx, device=q.device)
        mask = torch.stack([_position_bias(torch.tensor([length - 1], device=q.device), key_pos,
                                           sliding_window, alibi_slopes, q.dtype)
                            for length in lens])  # [n, heads or 1, 1, ctx]
        mask = mask.view(n, num_kv_heads, -1, ctx) if mask.shape[1] > 1 else mask
        res = F.scaled_dot_product_attention(query, keys, values, attn_mask=mask, scale=scale)
        out[start:end] = res.reshape(n, num_heads, head_dim)


def paged_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, k_cache: torch.Tensor,
                    v_cache: torch.Tensor, meta: AttentionMetadata, scale: float, *,
                    sliding_window: int | None = None,
                    alibi_slopes: torch.Tensor | None = None) -> torch.Tensor:
    """Causal attention of the step's query tokens over their paged contexts.

    ``q`` is ``[num_tokens, num_heads, head_dim]``; ``k``/``v`` are the same tokens' keys and
    values, already written to the cache. Returns ``[num_tokens, num_heads, head_dim]``.
    With ``sliding_window`` W a query sees only the keys of its last W positions (itself
    included); ``alibi_slopes`` ``[num_heads]`` (fp32) adds ``slope * (key position - query
    position)`` to the scaled scores.
    """
    out = torch.empty_like(q)
    biased = sliding_window is not None or alibi_slopes is not None
    if meta.backend == "triton":
        assert meta._seq_lens_i32 is not None and meta._query_start_loc is not None
        dispatch.triton_module("triton_attention", q.device).paged_attention(
            q, k_cache, v_cache, meta.block_tables, meta._seq_lens_i32, meta._query_start_loc,
            max(meta.query_lens), max(meta.seq_lens), scale, out,
            sliding_window=sliding_window, alibi_slopes=alibi_slopes)
        return out
    flat_k = k_cache.view(-1, *k_cache.shape[2:])
    flat_v = v_cache.view(-1, *v_cache.shape[2:])
    decodes = meta.num_decodes
    if decodes and meta._decode_in_place and cpu.takes_cache(q.dtype, k_cache.dtype):
        assert meta._decode_lens is not None
        cpu.decode_attention(q[:decodes], k_cache, v_cache, meta.block_tables[:decodes],
                             meta._decode_lens, scale, out[:decodes], sliding_window,
                             alibi_slopes)
    elif decodes and biased:
        _torch_decode_biased(q, flat_k, flat_v, meta, scale, out, sliding_window, alibi_slopes)
    elif decodes:
        _torch_decode(q, flat_k, flat_v, meta, scale, out)
    start = decodes
    for i, slots in enumerate(meta._prefill_slots, start=meta.num_decodes):
        n = meta.query_lens[i]
        query = q[start: start + n].transpose(0, 1).unsqueeze(0)
        if biased:
            if slots is None:
                keys = _as_stored(k[start: start + n], k_cache.dtype, q.dtype)
                values = _as_stored(v[start: start + n], v_cache.dtype, q.dtype)
            else:
                keys, values = _gather(flat_k, slots, q.dtype), _gather(flat_v, slots, q.dtype)
            ctx = keys.shape[0]
            mask = _position_bias(torch.arange(ctx - n, ctx, device=q.device),
                                  torch.arange(ctx, device=q.device), sliding_window,
                                  alibi_slopes, q.dtype)
            res = F.scaled_dot_product_attention(
                query, keys.transpose(0, 1).unsqueeze(0), values.transpose(0, 1).unsqueeze(0),
                attn_mask=mask.unsqueeze(0), scale=scale, enable_gqa=True)
        elif slots is None:
            keys = _as_stored(k[start: start + n], k_cache.dtype, q.dtype)
            values = _as_stored(v[start: start + n], v_cache.dtype, q.dtype)
            keys, values = keys.transpose(0, 1).unsqueeze(0), values.transpose(0, 1).unsqueeze(0)
            res = F.scaled_dot_product_attention(query, keys, values, is_causal=True, scale=scale,
                                                 enable_gqa=True)
        else:
            keys = _gather(flat_k, slots, q.dtype).transpose(0, 1).unsqueeze(0)
            values = _gather(flat_v, slots, q.dtype).transpose(0, 1).unsqueeze(0)
            ctx = slots.shape[0]
            # Query j sits at position ctx - n + j and sees every key at or before it.
            mask = torch.ones(n, ctx, dtype=torch.bool, device=q.device).tril(ctx - n)
            res = F.scaled_dot_product_attention(query, keys, values, attn_mask=mask, scale=scale,
                                                 enable_gqa=True)
        out[start: start + n] = res[0].transpose(0, 1)
        start += n
    return out
