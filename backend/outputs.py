"""What the engine hands back for a request: plain data, no behaviour."""

from __future__ import annotations

from dataclasses import dataclass, field

# One position's log-probabilities: token id -> logprob, the sampled token always included.
TokenLogprobs = dict[int, float]


@dataclass
class CompletionOutput:
    """One generated sequence of a request (a request with ``n > 1`` has several)."""

    index: int
    text: str
    token_ids: list[int]
    cumulative_logprob: float | None = None
    logprobs: list[TokenLogprobs] | None = None
    finish_reason: str | None = None  # "stop" | "length" | "abort", None while running
    stop_reason: str | int | None = None  # the stop string or stop token id that ended it
    score: float | None = None  # beam search: cumulative_logprob / length ** length_penalty

    @property
    def finished(self) -> bool:
        return self.finish_reason is not None


@dataclass
class RequestOutput:
    """A request's state after a step: the full text so far and, for streaming, the new part.

    ``outputs[i].text`` is cumulative; ``delta_texts[i]`` is what this step added to it, so a
    streaming client concatenating the deltas gets exactly the final text.
    """

    request_id: str
    prompt: str | None
    prompt_token_ids: list[int]
    outputs: list[CompletionOutput]
    finished: bool
    delta_texts: list[str] = field(default_factory=list)
    delta_token_ids: list[list[int]] = field(default_factory=list)
    # Set when the request's own step work failed: it ended there, with no completions.
    error: str | None = None
    # Prompt tokens whose keys and values came from the prefix cache when the request started.
    num_cached_tokens: int = 0
    # With ``SamplingParams.prompt_logprobs``: each prompt token's logprob and the most likely
    # tokens at its position (``None`` for the first token, which nothing predicts).
    prompt_logprobs: list[TokenLogprobs | None] | None = None
