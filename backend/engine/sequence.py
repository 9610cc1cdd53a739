"""A sequence's tokens, cache position and status; a request's group of sequences."""

from __future__ import annotations

import enum
from collections.abc import Mapping
from dataclasses import dataclass, field

import torch

from pagedserve.engine.beam_search import BeamSearch
from pagedserve.engine.block_manager import BlockTable, root_key
from pagedserve.engine.detokenizer import IncrementalDetokenizer
from pagedserve.engine.structured_output import CompiledConstraint, GrammarMatcher
from pagedserve.lora_request import LoRARequest
from pagedserve.outputs import TokenLogprobs
from pagedserve.sampling_params import SamplingParams


class SequenceStatus(enum.Enum):
    WAITING = "waiting"
    RUNNING = "running"
    FINISHED = "finished"


@dataclass(eq=False)
class Sequence:
    """One token stream being generated.

    ``token_ids`` holds prompt then output. The first ``num_computed_tokens`` of them have their
    K/V in the cache; the rest are computed by coming steps (a whole prompt, a prefill chunk, or
    the one token sampled last step). Preemption drops the cache and resets that count to zero, so
    the sequence recomputes prompt and output so far when it runs again.
    """

    seq_id: int
    request: Request
    index: int
    token_ids: list[int]
    num_prompt_tokens: int
    detokenizer: IncrementalDetokenizer
    generator: torch.Generator | None = None
    status: SequenceStatus = SequenceStatus.WAITING
    num_computed_tokens: int = 0
    block_table: BlockTable = field(default_factory=BlockTable)
    cumulative_logprob: float = 0.0
    logprobs: list[TokenLogprobs] = field(default_factory=list)
    finish_reason: str | None = None
    stop_reason: str | int | None = None
    num_preemptions: int = 0
    text_sent: int = 0  # characters of output text already handed to the caller
    grammar: GrammarMatcher | None = None  # where its output stands in the request's constraint

    @property
    def params(self) -> SamplingParams:
        return self.request.params

    @property
    def num_tokens(self) -> int:
        return len(self.token_ids)

    @property
    def num_output_tokens(self) -> int:
        return len(self.token_ids) - self.num_prompt_tokens

    @property
    def output_token_ids(self) -> list[int]:
        return self.token_ids[self.num_prompt_tokens:]

    @property
    def num_uncomputed_tokens(self) -> int:
        return len(self.token_ids) - self.num_computed_tokens

    @property
    def is_finished(self) -> bool:
        return self.status is SequenceStatus.FINISHED


@dataclass(eq=False)
class Request:
    """A user request: its prompt, parameters and the sequences generated for it.

    A request starts with one sequence. Its prompt is computed once; then it forks into its
    ``n`` samples or ``beam_width`` beams, which share the prompt's blocks. ``beam_search`` holds
    a beam-search request's state; its dropped beams leave ``seqs``.
    """

    request_id: str
    prompt: str | None
    prompt_token_ids: list[int]
    params: SamplingParams
    arrival: int
    max_model_len: int
    seqs: list[Sequence] = field(default_factory=list)
    forked: bool = False  # n > 1: the prompt's sequence has forked into its samples
    beam_search: BeamSearch | None = None
    # Lifecycle, wall-clock ns (what tracing and metrics report), and the caller's trace context.
    arrival_ns: int = 0
    trace_headers: Mapping[str, str] | None = None
    first_scheduled_ns: int | None = None
    first_token_ns: int | None = None
    last_token_ns: int | None = None
    preemption_ns: list[int] = field(default_factory=list)
    num_cached_tokens: int = 0  # prompt tokens the prefix cache served at first scheduling
    # With params.prompt_logprobs: each prompt position's candidates so far (None for the first).
    prompt_logprobs: list[TokenLogprobs | None] = field(default_factory=list)
    lora_request: LoRARequest | None = None  # the adapter it runs with; None: the base model
    # Its structured_outputs constraint, compiled before it was queued.
    constraint: CompiledConstraint | None = None

    @property
    def is_finished(self) -> bool:
        return all(s.is_finished for s in self.seqs)

    @property
    def live_seqs(self) -> list[Sequence]:
        return [s for s in self.seqs if not s.is_finished]

    @property
    def lora_id(self) -> int:
        return 0 if self.lora_request is None else self.lora_request.lora_int_id

    @property
    def prefix_root(self) -> bytes:
        """Where its sequences' prefix-cache chains start: its adapter's own root, so no
        adapter's K/V serves another's tokens."""
        lora = self.lora_request
        return root_key(None if lora is None else
                        f"lora\0{lora.lora_int_id}\0{lora.lora_name}\0{lora.lora_path}")

    @property
    def computes_prompt_logprobs(self) -> bool:
        """Whether logprobs of its prompt tokens are still to come (so its prompt is computed,
        not taken from the prefix cache)."""
        return (self.params.prompt_logprobs is not None
                and len(self.prompt_logprobs) < len(self.prompt_token_ids))
