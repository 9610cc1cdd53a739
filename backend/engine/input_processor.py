"""Admission of a request: every field checked against the model, then the prompt tokenized.

A request that passes cannot fail a batched step for reasons of its own making: token ids and
stop tokens lie inside the vocabulary, logprobs within the engine's cap, the prompt within the
context, and its sequences within the cache. Checks come cheapest first, so a prompt far too
long to ever fit is refused by its length in characters before any tokenizer time is spent.

Tokenization needs no engine state, so the async engine runs a processor on a thread of its
own (with its own tokenizer: fast tokenizers are not safe to share across threads) and a large
prompt never delays the tokens of requests already running.
"""

from __future__ import annotations

import itertools
import time
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from pagedserve.engine.sequence import Request
from pagedserve.engine.structured_output import CompiledConstraint
from pagedserve.lora_request import LoRARequest
from pagedserve.sampling_params import SamplingParams

# Input characters one token can cover, over the longest token string of the vocabulary.
# Byte-level and SentencePiece tokenizers never exceed 1; normalizers that fold characters
# (NFKC, accents) can, a little. The margin only has to keep real prompts admissible.
_CHARS_PER_TOKEN_CHAR = 4


@dataclass(frozen=True)
class AdmissionLimits:
    """What a request is checked against: the model's and the engine's sizes."""

    vocab_size: int
    max_model_len: int
    max_num_seqs: int
    max_num_batched_tokens: int
    enable_chunked_prefill: bool
    num_usable_blocks: int
    block_size: int
    max_logprobs: int
    max_prompt_chars: int  # no prompt longer than this can fit max_model_len tokens
    enable_lora: bool = False


def max_prompt_chars(tokenizer: Any, max_model_len: int) -> int:
    """An upper bound on the characters of a prompt that tokenizes to ``max_model_len`` tokens."""
    longest = max((len(token) for token in tokenizer.get_vocab()), default=1)
    return max_model_len * max(longest, 1) * _CHARS_PER_TOKEN_CHAR


class InputProcessor:
    """Validates and tokenizes requests; owns its tokenizer, touches no engine state."""

    def __init__(self, tokenizer: Any, limits: AdmissionLimits) -> None:
        self.tokenizer = tokenizer
        self.limits = limits
        self._arrivals = itertools.count()

    def make_request(self, request_id: str, prompt: str | None,
                     params: SamplingParams | None = None,
                     prompt_token_ids: list[int] | None = None,
                     arrival_ns: int | None = None,
                     trace_headers: Mapping[str, str] | None = None,
                     lora_request: LoRARequest | None = None,
                     constraint: CompiledConstraint | None = None) -> Request:
        """The request, ready to queue; raises ``ValueError`` naming the offending field.

        ``arrival_ns`` (wall clock, default now) is when the caller handed it over;
        ``trace_headers`` the W3C trace context it came with, for its trace span;
        ``constraint`` its ``structured_outputs`` compiled (required when it has one).
        """
        arrival_ns = time.time_ns() if arrival_ns is None else arrival_ns
        limits = self.limits
        params = params or SamplingParams()
        self._check_params(params)
        if (params.structured_outputs is None) != (constraint is None):
            raise ValueError("structured_outputs: a constrained request needs its compiled "
                             "constraint, and only it has one")
        if lora_request is not None:
            if not isinstance(lora_request, LoRARequest):
                raise ValueError(f"lora_request must be a LoRARequest, got "
                                 f"{type(lora_request).__name__}")
            if not limits.enable_lora:
                raise ValueError(f"lora_request: LoRA is not enabled (adapter "
                                 f"{lora_request.lora_name!r}); start the engine with "
                                 f"enable_lora=True")
        if prompt_token_ids is None:
            if prompt is None:
                raise ValueError("prompt: either a prompt or prompt_token_ids is required")
            if not isinstance(prompt, str):
                raise ValueError(f"prompt must be a string, got {type(prompt).__name__}")
            if len(prompt) > limits.max_prompt_chars:
                raise ValueError(f"prompt is {len(prompt)} characters long; no prompt over "
                                 f"{limits.max_prompt_chars} characters fits the maximum "
                                 f"context length of {limits.max_model_len} tokens")
            prompt_token_ids = self.tokenizer.encode(prompt, add_special_tokens=True)
        elif len(prompt_token_ids) >= limits.max_model_len:
            # Checked before the ids are copied and scanned.
            self._refuse_length(len(prompt_token_ids))
        prompt_token_ids = list(prompt_token_ids)
        if not prompt_token_ids:
            raise ValueError("prompt must not be empty")
        bad = [t for t in prompt_token_ids
               if isinstance(t, bool) or not isinstance(t, int) or not 0 <= t < limits.vocab_size]
        if bad:
            raise ValueError(f"prompt_token_ids: token id {bad[0]!r} is outside the vocabulary "
                             f"[0, {limits.vocab_size})")
        if len(prompt_token_ids) >= limits.max_model_len:
            self._refuse_length(len(prompt_token_ids))
        if (not limits.enable_chunked_prefill
                and len(prompt_token_ids) > limits.max_num_batched_tokens):
            raise ValueError(f"prompt is {len(prompt_token_ids)} tokens long, more than "
                             f"max_num_batched_tokens ({limits.max_num_batched_tokens}) "
                             "with chunked prefill disabled")
        if params.num_seqs > 1:
            # All of a request's sequences must fit the cache together, or it could never run.
            longest = min(len(prompt_token_ids) + (params.max_tokens or limits.max_model_len),
                          limits.max_model_len)
            needed = params.num_seqs * -(-longest // limits.block_size)
            if needed > limits.num_usable_blocks:
                raise ValueError(
                    f"max_tokens: {params.num_seqs} sequences of up to {longest} tokens need up "
                    f"to {needed} KV blocks, more than the cache's "
                    f"{limits.num_usable_blocks}; lower max_tokens")
        return Request(request_id, prompt, prompt_token_ids, params, next(self._arrivals),
                       limits.max_model_len, arrival_ns=arrival_ns, trace_headers=trace_headers,
                       lora_request=lora_request, constraint=constraint)

    def _refuse_length(self, num_tokens: int) -> None:
        raise ValueError(f"prompt is {num_tokens} tokens long; the maximum context length is "
                         f"{self.limits.max_model_len} (prompt plus at least one generated "
                         "token)")

    def _check_params(self, params: SamplingParams) -> None:
        """The sampling fields whose valid range depends on the model and the engine."""
        limits = self.limits
        if params.num_seqs > limits.max_num_seqs:
            field = "beam_width" if params.use_beam_search else "n"
            raise ValueError(f"SamplingParams.{field} is {params.num_seqs}, more than "
                             f"max_num_seqs ({limits.max_num_seqs})")
        for name in ("logprobs", "prompt_logprobs"):
            value = getattr(params, name)
            if value is not None and value > limits.max_logprobs:
                raise ValueError(f"SamplingParams.{name} is {value}, more than the engine's "
                                 f"max_logprobs ({limits.max_logprobs})")
        outside = [t for t in params.stop_token_ids if t >= limits.vocab_size]
        if outside:
            raise ValueError(f"SamplingParams.stop_token_ids: token id {outside[0]} is outside "
                             f"the vocabulary [0, {limits.vocab_size})")
