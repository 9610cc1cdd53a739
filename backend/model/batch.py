"""The contract between scheduler and runner: one step's work as plain data, and its result.

The scheduler decides what runs and snapshots it here; the runner turns it into tensors and
never sees a live sequence, so nothing it reads can change under it. Being plain data, a step
also travels as it is to tensor-parallel workers in other processes (or on other machines).
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch

from pagedserve.lora_request import LoRARequest


@dataclass(frozen=True)
class SeqChunk:
    """The tokens one sequence computes in a step.

    A chunk that ends the sequence's known tokens wants the logits of its last row; one that
    also carries draft tokens (speculative decoding) wants those of its last row before the
    drafts and of every draft, to check each draft and pick the token after them.

    A prompt chunk of a request that asks for prompt logprobs wants, for the rows from
    ``prompt_first_row`` on, the logprob of each row's next prompt token (``prompt_targets``)
    and the ``prompt_logprobs`` most likely tokens there.
    """

    seq_id: int
    token_ids: list[int]  # the new tokens, at positions start, start + 1, ...
    start: int  # tokens before it are in the cache already
    block_table: list[int]  # the sequence's blocks, covering start + len(token_ids) tokens
    num_logits: int  # how many trailing rows' logits are wanted (0: none)
    prompt_logprobs: int | None = None
    prompt_first_row: int = 0
    prompt_targets: list[int] = field(default_factory=list)
    lora_id: int = 0  # the adapter it runs with (``ModelInput.loras``), 0: the base model

    def __post_init__(self) -> None:
        if not 0 <= self.num_logits <= len(self.token_ids):
            raise ValueError(f"num_logits must be in [0, {len(self.token_ids)}] (the chunk's "
                             f"tokens), got {self.num_logits}")
        if self.prompt_first_row + len(self.prompt_targets) > len(self.token_ids):
            raise ValueError("prompt_targets must name the next token of rows of the chunk")


@dataclass(frozen=True)
class ModelInput:
    """A step's chunks (decodes first), the block copies to make before attention, and the
    adapters its chunks run with, by id."""

    chunks: list[SeqChunk] = field(default_factory=list)
    block_copies: list[tuple[int, int]] = field(default_factory=list)
    loras: dict[int, LoRARequest] = field(default_factory=dict)


@dataclass(frozen=True)
class PromptLogprobs:
    """A chunk's prompt logprobs: per wanted row, its next token's logprob and the most likely
    tokens there, as (token, logprob) pairs."""

    token_logprobs: list[float]
    top: list[list[tuple[int, float]]]


@dataclass
class ModelOutput:
    """The wanted rows' logits, in chunk order and within a chunk in token order: row ``i``
    belongs to sequence ``seq_ids[i]`` (a chunk with drafts has several rows in a row)."""

    seq_ids: list[int]
    logits: torch.Tensor  # [len(seq_ids), vocab] fp32
    # Time the step spent in tensor-parallel communication (0 on one device).
    comm_ns: int = 0
    prompt_logprobs: dict[int, PromptLogprobs] = field(default_factory=dict)  # by sequence
