"""Tensor parallelism as Megatron and vLLM split a decoder: what a rank holds, and its collectives.

Each of ``world_size`` ranks holds a slice of every projection: the q/k/v and gate/up projections
by output rows (column-parallel: whole attention heads and a share of the MLP's width), the
attention output and down projections by input columns (row-parallel: partial sums, added up by
one all-reduce each), the embedding and output projection by vocabulary rows. Norms are
replicated. The collectives take the group explicitly and count their calls, bytes and time into
the group's :class:`CommStats`, which the executor reads for its benchmark.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from typing import Any

import torch
import torch.distributed as dist
from transformers import PretrainedConfig

from pagedserve.kernels.linear import linear
from pagedserve.kernels.quant_linear import Weight

# The model types whose layers shard (``pagedserve.model.llama`` serves them all).
SHARDED_FAMILIES = ("llama", "mistral", "qwen2", "qwen3")


@dataclass
class CommStats:
    """What a rank's collectives cost: calls, bytes of the tensors this rank handed in, and the
    host wall time spent inside them (on NCCL, which runs on the stream, the time to enqueue)."""

    calls: int = 0
    bytes: int = 0
    ns: int = 0


@dataclass
class ParallelGroup:
    """This rank's place in a tensor-parallel group."""

    rank: int
    world_size: int
    group: Any  # a torch.distributed ProcessGroup (None only when world_size == 1)
    stats: CommStats = field(default_factory=CommStats)


def check_tensor_parallel(config: PretrainedConfig, world_size: int) -> None:
    """Raises ``ValueError`` naming the numbers when the model described by ``config`` cannot be
    split over ``world_size`` ranks: heads, KV heads and the MLP width must divide evenly (the
    vocabulary is padded instead), and the family must be one whose layers shard."""
    if isinstance(world_size, bool) or not isinstance(world_size, int) or world_size < 1:
        raise ValueError(f"tensor_parallel_size must be an integer >= 1, got {world_size!r}")
    if world_size == 1:
        return
    if config.model_type not in SHARDED_FAMILIES:
        raise ValueError(f"tensor parallelism supports the Llama family "
                         f"({', '.join(SHARDED_FAMILIES)}); {config.model_type} cannot be split "
                         f"(tensor_parallel_size={world_size})")
    sizes = {"query heads (num_attention_heads)": config.num_attention_heads,
             "KV heads (num_key_value_heads)": config.num_key_value_heads,
             "intermediate size (intermediate_size)": config.intermediate_size}
    bad = [f"{value} {name}" for name, value in sizes.items() if value % world_size]
    if bad:
        raise ValueError(f"tensor_parallel_size={world_size} does not divide the model: "
                         f"{', '.join(bad)} not divisible by {world_size}")


def shard(t: torch.Tensor, dim: int, pg: ParallelGroup) -> torch.Tensor:
    """This rank's equal slice of ``t`` along ``dim``, as a copy of its own (so that the full
    tensor can be freed)."""
    size = t.shape[dim] // pg.world_size
    return t.narrow(dim, pg.rank * size, size).clone(memory_format=torch.contiguous_format)


def vocab_shard(t: torch.Tensor, pg: ParallelGroup) -> torch.Tensor:
    """This rank's rows of an embedding or output projection ``[vocab, hidden]``, the vocabulary
    padded with zero rows to a multiple of the world size."""
    size = -(-t.shape[0] // pg.world_size)
    start = pg.rank * size
    rows = t[start: start + size]
    if rows.shape[0] == size:
        return rows.clone(memory_format=torch.contiguous_format)
    padded = rows.new_zeros(size, *t.shape[1:])
    padded[: rows.shape[0]] = rows
    return padded


def _counted(pg: ParallelGroup, x: torch.Tensor, start_ns: int) -> None:
    pg.stats.calls += 1
    pg.stats.bytes += x.numel() * x.element_size()
    pg.stats.ns += time.perf_counter_ns() - start_ns


def all_reduce(x: torch.Tensor, pg: ParallelGroup) -> torch.Tensor:
    """The sum of ``x`` over the group, in place (gloo and NCCL both add bf16 and fp16)."""
    if pg.world_size == 1:
        return x
    start = time.perf_counter_ns()
    dist.all_reduce(x, group=pg.group)
    _counted(pg, x, start)
    return x


def all_gather_last_dim(x: torch.Tensor, pg: ParallelGroup) -> torch.Tensor:
    """Every rank's ``x`` concatenated along the last dimension, in rank order."""
    if pg.world_size == 1:
        return x
    start = time.perf_counter_ns()
    x = x.contiguous()
    parts = [torch.empty_like(x) for _ in range(pg.world_size)]
    dist.all_gather(parts, x, group=pg.group)
    _counted(pg, x, start)
    return torch.cat(parts, dim=-1)


def row_parallel_linear(x: torch.Tensor, weight: Weight, bias: torch.Tensor | None,
                        pg: ParallelGroup | None) -> torch.Tensor:
    """``x @ weight.T + bias`` where ``x`` and ``weight`` hold this rank's share of the input
    features: the partial products are summed over the group, and the bias added once."""
    if pg is None:
        return linear(x, weight, bias)
    out = all_reduce(linear(x, weight), pg)
    return out if bias is None else out.add_(bias)


def vocab_parallel_embedding(input_ids: torch.Tensor, rows: torch.Tensor,
                             pg: ParallelGroup) -> torch.Tensor:
    """Embeddings of ``input_ids`` from this rank's vocabulary ``rows`` (zeros for the ids other
    ranks hold), summed over the group."""
    local = input_ids - pg.rank * rows.shape[0]
    outside = (local < 0) | (local >= rows.shape[0])
    h = rows[local.masked_fill(outside, 0)]
    return all_reduce(h.masked_fill_(outside.unsqueeze(-1), 0), pg)
