"""What the engine tells its observers: one record per step, one per request that ends.

The core thread builds these records from its own counters as a step ends and hands them to
its observers (tracing, metrics) on that thread, so no other thread ever reads engine state.
Records are plain data: an observer keeps or forwards them as it likes. Times are wall-clock
nanoseconds (``time.time_ns``), the clock OpenTelemetry spans and Prometheus both use.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Protocol


@dataclass(frozen=True)
class RequestInfo:
    """A request as it enters the engine: who it is and what it asked for."""

    request_id: str
    arrival_ns: int
    num_prompt_tokens: int
    max_tokens: int | None
    temperature: float
    top_p: float
    n: int
    # W3C trace context (``traceparent``, ``tracestate``) the caller sent, if any.
    trace_headers: Mapping[str, str] | None = None
    # The LoRA adapter it runs with (its ``lora_name``); None: the base model.
    lora_name: str | None = None


@dataclass(frozen=True)
class FinishedRequest:
    """A request that has ended: finished, aborted or failed, with its lifecycle times."""

    request_id: str
    arrival_ns: int
    first_scheduled_ns: int | None  # None if it never ran
    first_token_ns: int | None
    finished_ns: int
    preemption_ns: tuple[int, ...]
    num_prompt_tokens: int
    num_generation_tokens: int  # all sequences together
    finish_reasons: tuple[str, ...]  # one per sequence returned ("stop", "length", "abort")
    error: str | None = None
    num_cached_tokens: int = 0  # prompt tokens found in the prefix cache when first scheduled

    @property
    def aborted(self) -> bool:
        return self.error is None and "abort" in self.finish_reasons

    @property
    def queue_s(self) -> float | None:
        first = self.first_scheduled_ns
        return None if first is None else (first - self.arrival_ns) / 1e9

    @property
    def ttft_s(self) -> float | None:
        first = self.first_token_ns
        return None if first is None else (first - self.arrival_ns) / 1e9

    @property
    def e2e_s(self) -> float:
        return (self.finished_ns - self.arrival_ns) / 1e9

    @property
    def prefill_s(self) -> float | None:
        if self.first_token_ns is None or self.first_scheduled_ns is None:
            return None
        return (self.first_token_ns - self.first_scheduled_ns) / 1e9

    @property
    def decode_s(self) -> float | None:
        first = self.first_token_ns
        return None if first is None else (self.finished_ns - first) / 1e9


@dataclass(frozen=True)
class StepStats:
    """One engine step: what it ran, what the cache looked like after it, where its time went."""

    step: int
    # Phase boundaries: schedule [start, scheduled), forward [scheduled, forwarded), sample
    # [forwarded, sampled), output [sampled, end).
    start_ns: int
    scheduled_ns: int
    forwarded_ns: int
    sampled_ns: int
    end_ns: int
    num_running: int  # requests running as the step was scheduled
    num_waiting: int
    num_preempted: int  # requests preempted by this step's scheduling
    num_prefill_tokens: int  # prompt (or recomputed) tokens run
    num_decode_tokens: int
    num_scheduled_seqs: int
    num_generated_tokens: int  # tokens sampled and appended
    num_blocks_used: int
    num_blocks_free: int
    num_blocks_cached: int
    num_blocks_total: int
    prefix_cache_queried_tokens: int  # this step's admissions
    prefix_cache_hit_tokens: int
    num_cow_copies: int
    num_evictions: int
    request_ids: tuple[str, ...]  # the requests this step served
    preempted_request_ids: tuple[str, ...] = ()
    # Latencies completed in this step, seconds: first tokens, and gaps between tokens.
    time_to_first_token_s: tuple[float, ...] = ()
    inter_token_latency_s: tuple[float, ...] = ()
    failed_request_ids: tuple[str, ...] = field(default=())
    # Speculative decoding: draft tokens checked, and of those the ones the model agreed with.
    num_draft_tokens: int = 0
    num_accepted_tokens: int = 0

    @property
    def num_tokens(self) -> int:
        return self.num_prefill_tokens + self.num_decode_tokens


class EngineObserver(Protocol):
    """Receives the engine's records on the core thread; must be quick and never raise."""

    def on_request_added(self, request: RequestInfo) -> None: ...

    def on_step(self, stats: StepStats) -> None: ...

    def on_request_finished(self, request: FinishedRequest) -> None: ...

    def shutdown(self) -> None:
        """Flushes what is buffered; called when the engine stops."""
