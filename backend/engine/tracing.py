"""OpenTelemetry spans: one around every engine step, one per request, linked both ways.

``engine.step`` spans carry the step's counts (batch, cache, prefix hits, preemptions) and four
children for its phases (schedule, forward, sample, output); each links to the ``llm_request``
spans of the requests it served. An ``llm_request`` span (vLLM's name and ``gen_ai.*``
attributes, so existing dashboards find it) runs from the request's arrival to its end, under
the caller's W3C trace context when one came with it, with events for its milestones.

Spans are made from the engine's plain records after the fact, with their recorded start and
end times: the step itself does no tracing work, and with tracing off (level ``OFF``) nothing
here runs beyond one attribute check.

Flushes (an engine stopping, the server exiting) wait at most ``FLUSH_SECONDS``
(``flush_spans``), so an unreachable collector cannot hold an unload or SIGTERM for the
exporter's own timeouts and retries.
"""

from __future__ import annotations

import logging
import threading
import weakref
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from opentelemetry import trace
from opentelemetry.propagators.textmap import DefaultGetter
from opentelemetry.trace import Link, SpanKind, Status, StatusCode
from opentelemetry.trace.propagation.tracecontext import TraceContextTextMapPropagator

from pagedserve.engine.stats import FinishedRequest, RequestInfo, StepStats

log = logging.getLogger(__name__)

_PROPAGATOR = TraceContextTextMapPropagator()
_GETTER: DefaultGetter = DefaultGetter()

# How long one flush of the buffered spans may wait on the exporter. A collector that answers
# takes milliseconds; one that does not would hold the flush for the exporter's timeout (10 s
# per export by default, ``OTEL_EXPORTER_OTLP_TIMEOUT``) and its retries, and every stopping
# engine and the exit after them would wait that long in turn.
FLUSH_SECONDS = 3.0
# Per tracer provider, a flush that overran its bound and still waits on the exporter: later
# flushes would queue behind it (the batch processor exports under one lock), so they return.
_overrun: weakref.WeakKeyDictionary[Any, threading.Thread] = weakref.WeakKeyDictionary()
_overrun_lock = threading.Lock()


def flush_spans(provider: Any, timeout: float = FLUSH_SECONDS, final: bool = False) -> bool:
    """Exports what ``provider`` buffers (with ``final``, shuts it down), waiting ``timeout``
    seconds at most; returns whether it finished in time.

    The SDK's own bounds do not hold: ``force_flush(timeout_millis)`` is passed on, but the
    batch span processor of SDK 1.x exports without looking at it (its "TODO", issue
    open-telemetry/opentelemetry-python#4568), and its ``shutdown`` takes none. So the work runs
    on a daemon thread, which is left behind when it overruns (the exit does not wait for it);
    while it still runs, later flushes of the provider return at once, so a run of stopping
    engines and the exit after them wait ``timeout`` in all, not each.
    """
    action = getattr(provider, "shutdown" if final else "force_flush", None)
    if action is None:  # the API's no-op provider
        return True
    with _overrun_lock:
        stuck = _overrun.get(provider)
        if stuck is not None and not stuck.is_alive():
            del _overrun[provider]
            stuck = None
    if stuck is not None:
        log.warning("spans not exported: an earlier export still waits on the collector")
        return False
    if final:
        worker = threading.Thread(target=action, name="span-flush", daemon=True)
    else:
        worker = threading.Thread(target=action, name="span-flush", daemon=True,
                                  kwargs={"timeout_millis": int(timeout * 1000)})
    worker.start()
    worker.join(timeout)
    if worker.is_alive():
        with _overrun_lock:
            _overrun[provider] = worker
        log.warning("span export did not finish within %g s (is the collector reachable?): "
                    "going on without it", timeout)
        return False
    return True


@dataclass
class TraceSettings:
    """Triton's trace settings, changed at run time by its ``TraceSetting`` RPC.

    ``level`` ``OFF`` stops all tracing; any other level traces. ``rate`` samples one request in
    ``rate`` (a request whose caller's trace context is sampled is always traced); ``count``
    caps how many more requests are traced (-1: no cap). Step spans are the engine's timeline:
    every step is traced while tracing is on.
    """

    level: str = "OFF"
    rate: int = 1000
    count: int = -1

    @property
    def enabled(self) -> bool:
        return self.level.upper() != "OFF"


class EngineTracer:
    """An engine observer that turns its records into spans for one model version."""

    def __init__(self, tracer_provider: trace.TracerProvider, settings: TraceSettings,
                 model_name: str, model_version: str) -> None:
        self._tracer = tracer_provider.get_tracer("pagedserve")
        self._provider = tracer_provider
        self.settings = settings
        self._model = {"model.name": model_name, "model.version": model_version}
        self._spans: dict[str, trace.Span] = {}  # live llm_request spans by request id
        self._seen = 0  # requests offered for sampling
        self._lock = threading.Lock()  # settings may change on the event loop meanwhile

    # ---- requests ----------------------------------------------------------------------

    def on_request_added(self, request: RequestInfo) -> None:
        if not self.settings.enabled:
            return
        parent = None
        if request.trace_headers:
            parent = _PROPAGATOR.extract(request.trace_headers, getter=_GETTER)
        if not self._sample(parent):
            return
        attributes: dict[str, Any] = {
            "gen_ai.request.id": request.request_id,
            "gen_ai.request.temperature": request.temperature,
            "gen_ai.request.top_p": request.top_p,
            "gen_ai.request.n": request.n,
            "gen_ai.usage.prompt_tokens": request.num_prompt_tokens,
            **self._model,
        }
        if request.max_tokens is not None:
            attributes["gen_ai.request.max_tokens"] = request.max_tokens
        if request.lora_name is not None:  # no semantic convention names it; vLLM sets none
            attributes["gen_ai.request.lora_name"] = request.lora_name
        span = self._tracer.start_span("llm_request", context=parent, kind=SpanKind.SERVER,
                                       start_time=request.arrival_ns, attributes=attributes)
        span.add_event("queued", timestamp=request.arrival_ns)
        self._spans[request.request_id] = span

    def _sample(self, parent: Any) -> bool:
        parent_span = trace.get_current_span(parent) if parent is not None else None
        if parent_span is not None and parent_span.get_span_context().trace_flags.sampled:
            return True
        with self._lock:
            if self.settings.count == 0:
                return False
            self._seen += 1
            if (self._seen - 1) % max(self.settings.rate, 1):
                return False
            if self.settings.count > 0:
                self.settings.count -= 1
            return True

    def on_request_finished(self, request: FinishedRequest) -> None:
        span = self._spans.pop(request.request_id, None)
        if span is None:
            return
        if request.first_scheduled_ns is not None:
            span.add_event("first_scheduled", timestamp=request.first_scheduled_ns)
        if request.first_token_ns is not None:
            span.add_event("first_token", timestamp=request.first_token_ns)
        for when in request.preemption_ns:
            span.add_event("preempted", timestamp=when)
        ended = "finished" if not request.aborted and request.error is None else "aborted"
        reasons = list(request.finish_reasons)
        span.add_event(ended, {"reason": request.error or ",".join(reasons)},
                       timestamp=request.finished_ns)
        latencies = {
            "gen_ai.latency.time_in_queue": request.queue_s,
            "gen_ai.latency.time_to_first_token": request.ttft_s,
            "gen_ai.latency.e2e": request.e2e_s,
            "gen_ai.latency.time_in_model_prefill": request.prefill_s,
            "gen_ai.latency.time_in_model_decode": request.decode_s,
        }
        span.set_attributes({
            "gen_ai.usage.completion_tokens": request.num_generation_tokens,
            "gen_ai.usage.cached_tokens": request.num_cached_tokens,
            "gen_ai.response.finish_reasons": reasons,
            **{k: v for k, v in latencies.items() if v is not None},
        })
        if request.error is not None:
            span.set_status(Status(StatusCode.ERROR, request.error))
        span.end(end_time=request.finished_ns)

    # ---- steps -------------------------------------------------------------------------

    def on_step(self, stats: StepStats) -> None:
        if not self.settings.enabled:
            return
        links = [Link(span.get_span_context()) for rid in stats.request_ids
                 if (span := self._spans.get(rid)) is not None]
        span = self._tracer.start_span("engine.step", kind=SpanKind.INTERNAL,
                                       start_time=stats.start_ns, links=links,
                                       attributes=_step_attributes(stats, self._model))
        context = trace.set_span_in_context(span)
        for name, start, end in (("schedule", stats.start_ns, stats.scheduled_ns),
                                 ("forward", stats.scheduled_ns, stats.forwarded_ns),
                                 ("sample", stats.forwarded_ns, stats.sampled_ns),
                                 ("output", stats.sampled_ns, stats.end_ns)):
            self._tracer.start_span(f"engine.step.{name}", context=context,
                                    start_time=start).end(end_time=end)
        span.end(end_time=stats.end_ns)

    def shutdown(self) -> None:
        """Ends the spans of requests still open (the engine is stopping) and flushes, for
        ``FLUSH_SECONDS`` at most."""
        for span in self._spans.values():
            span.set_status(Status(StatusCode.ERROR, "engine shut down"))
            span.end()
        self._spans.clear()
        flush_spans(self._provider)


def _step_attributes(stats: StepStats, model: Mapping[str, str]) -> dict[str, Any]:
    return {
        "engine.step": stats.step,
        "engine.requests.running": stats.num_running,
        "engine.requests.waiting": stats.num_waiting,
        "engine.requests.preempted": stats.num_preempted,
        "engine.batch.prefill_tokens": stats.num_prefill_tokens,
        "engine.batch.decode_tokens": stats.num_decode_tokens,
        "engine.batch.sequences": stats.num_scheduled_seqs,
        "engine.batch.generated_tokens": stats.num_generated_tokens,
        "engine.kv_blocks.used": stats.num_blocks_used,
        "engine.kv_blocks.free": stats.num_blocks_free,
        "engine.kv_blocks.cached": stats.num_blocks_cached,
        "engine.prefix_cache.queried_tokens": stats.prefix_cache_queried_tokens,
        "engine.prefix_cache.hit_tokens": stats.prefix_cache_hit_tokens,
        "engine.kv_blocks.cow_copies": stats.num_cow_copies,
        "engine.kv_blocks.evictions": stats.num_evictions,
        "engine.requests.failed": len(stats.failed_request_ids),
        **model,
    }
