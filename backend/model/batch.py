"""The contract between scheduler and runner: one step's work as plain data, and its result.

The scheduler decides what runs and snapshots it here; the runner turns it into tensors and
never sees a live sequence, so nothing it reads can change under it. Being plain data, a step
also travels as it is to tensor-parallel workers in other processes (or on other machines).
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch


@dataclass(frozen=True)
class SeqChunk:
    """The tokens one sequence computes in a step."""

    seq_id: int
    token_ids: list[int]  # the new tokens, at positions start, start + 1, ...
    start: int  # tokens before it are in the cache already
    block_table: list[int]  # the sequence's blocks, covering start + len(token_ids) tokens
    sample: bool  # the chunk ends the sequence's known tokens: its logits are wanted


@dataclass(frozen=True)
class ModelInput:
    """A step's chunks (decodes first) and the block copies to make before attention."""

    chunks: list[SeqChunk] = field(default_factory=list)
    block_copies: list[tuple[int, int]] = field(default_factory=list)


@dataclass
class ModelOutput:
    """Logits of the chunks that wanted them, in chunk order."""

    seq_ids: list[int]
    logits: torch.Tensor  # [len(seq_ids), vocab] fp32
    # Time the step spent in tensor-parallel communication (0 on one device).
    comm_ns: int = 0
