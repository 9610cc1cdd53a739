"""Step and request spans, checked with the SDK's in-memory exporter against the engine itself.

Every step's span must carry exactly the counts the scheduler and block manager had at that
step (recorded here by wrapping the scheduler), link the request spans it served, and be
parent of its four phase spans; preemption, abort and prefix-cache hits must show in the right
step and request spans.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import pytest
from opentelemetry.sdk.trace import ReadableSpan, TracerProvider
from opentelemetry.sdk.trace.export import SimpleSpanProcessor
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter

from pagedserve import LLM, EngineConfig, SamplingParams
from pagedserve.engine.core import EngineCore
from pagedserve.engine.scheduler import Scheduler
from pagedserve.engine.tracing import EngineTracer, TraceSettings
from pagedserve.model.loader import LoadedModel, load_model
from tests.prompts import LONG_PROMPT, TOKENIZER_VOCAB


@dataclass
class SchedulerCounts:
    prefill: int
    decode: int
    sequences: int
    preempted: int
    running: int
    waiting: int


@pytest.fixture(scope="module")
def tiny(tiny_llama: Any) -> LoadedModel:
    """A two-layer random Llama: spans do not depend on the weights, and it steps fast."""
    return load_model(str(tiny_llama(vocab_size=TOKENIZER_VOCAB)))  # fed text


@pytest.fixture
def traced(tiny: LoadedModel, monkeypatch: pytest.MonkeyPatch) -> Any:
    """An engine reporting to an in-memory exporter, and the scheduler's own per-step counts."""
    exporter = InMemorySpanExporter()
    provider = TracerProvider()
    provider.add_span_processor(SimpleSpanProcessor(exporter))
    counts: list[SchedulerCounts] = []
    original = Scheduler.schedule

    def schedule(self: Scheduler) -> Any:
        out = original(self)
        if not out.is_empty:
            counts.append(SchedulerCounts(
                out.num_prefill_tokens, out.num_decode_tokens, len(out.scheduled),
                len({s.request for s in out.preempted}), len(self.running), len(self.waiting)))
        return out

    monkeypatch.setattr(Scheduler, "schedule", schedule)

    def make(**config: Any) -> tuple[EngineCore, InMemorySpanExporter, list[SchedulerCounts]]:
        tracer = EngineTracer(provider, TraceSettings("TIMESTAMPS", rate=1), "smollm2", "1")
        core = EngineCore(EngineConfig(**config), tiny, observers=[tracer])
        return core, exporter, counts

    return make


def _named(spans: tuple[ReadableSpan, ...], name: str) -> list[ReadableSpan]:
    return [s for s in spans if s.name == name]


def _run(core: EngineCore, requests: list[tuple[str, str, SamplingParams]]) -> int:
    for request_id, prompt, params in requests:
        core.add_request(core.make_request(request_id, prompt, params))
    steps = 0
    while core.has_unfinished_requests:
        core.step()
        steps += 1
    return steps


def test_every_step_has_a_span_with_the_schedulers_counts(traced: Any) -> None:
    # A cache of few blocks, so long requests preempt each other.
    block_bytes = 2 * 2 * 2 * 64 * 4 * 16  # K and V, layers, KV heads, head dim, fp32
    core, exporter, counts = traced(kv_cache_bytes=16 * block_bytes,
                                    max_num_batched_tokens=64)
    params = SamplingParams(temperature=0, max_tokens=40, ignore_eos=True)
    steps = _run(core, [(f"r{i}", "Write a story about a dragon. " * 3, params)
                        for i in range(6)])
    spans = exporter.get_finished_spans()
    step_spans = sorted(_named(spans, "engine.step"), key=lambda s: s.attributes["engine.step"])
    assert len(step_spans) == steps == len(counts) == core.stats().num_steps
    assert core.stats().num_preemptions > 0, "the test needs preemption"
    requests = {s.attributes["gen_ai.request.id"]: s for s in _named(spans, "llm_request")}
    for number, (span, want) in enumerate(zip(step_spans, counts), start=1):
        a = span.attributes
        assert a["engine.step"] == number
        assert (a["engine.batch.prefill_tokens"], a["engine.batch.decode_tokens"],
                a["engine.batch.sequences"], a["engine.requests.preempted"],
                a["engine.requests.running"], a["engine.requests.waiting"]) == (
            want.prefill, want.decode, want.sequences, want.preempted, want.running,
            want.waiting)
        assert a["engine.kv_blocks.used"] + a["engine.kv_blocks.free"] == \
            core.block_manager.num_usable_blocks
        children = [c for c in spans if c.parent is not None
                    and c.parent.span_id == span.context.span_id]
        assert sorted(c.name for c in children) == sorted(
            f"engine.step.{p}" for p in ("schedule", "forward", "sample", "output"))
        assert all(span.start_time <= c.start_time <= c.end_time <= span.end_time
                   for c in children)
        linked = {link.context.span_id for link in span.links}
        assert linked and linked <= {r.context.span_id for r in requests.values()}
    # Each preemption is an event of the preempted request, at the end of that step's schedule.
    preempting = [s for s in step_spans if s.attributes["engine.requests.preempted"]]
    events = [e for r in requests.values() for e in r.events if e.name == "preempted"]
    schedule_ends = {c.end_time for c in _named(spans, "engine.step.schedule")
                     if c.parent.span_id in {s.context.span_id for s in preempting}}
    assert events and {e.timestamp for e in events} <= schedule_ends
    for span in requests.values():
        a = span.attributes
        assert a["gen_ai.usage.completion_tokens"] == 40
        assert a["gen_ai.response.finish_reasons"] == ("length",)
        assert 0 <= a["gen_ai.latency.time_in_queue"] <= a["gen_ai.latency.time_to_first_token"]
        assert a["gen_ai.latency.time_to_first_token"] <= a["gen_ai.latency.e2e"]
        assert [e.name for e in span.events][:1] == ["queued"]
        assert span.events[-1].name == "finished"
        # The request span covers every step that served it.
        served = [s for s in step_spans
                  if span.context.span_id in {link.context.span_id for link in s.links}]
        assert served and all(span.start_time <= s.start_time and s.end_time <= span.end_time
                              for s in served)


def test_abort_and_prefix_hit_show_in_their_spans(traced: Any) -> None:
    core, exporter, _ = traced(kv_cache_bytes=64 * 2**20)
    long = SamplingParams(temperature=0, max_tokens=200, ignore_eos=True)
    core.add_request(core.make_request("first", LONG_PROMPT, long))
    for _ in range(3):
        core.step()
    core.abort("first")
    _run(core, [("second", LONG_PROMPT, SamplingParams(temperature=0, max_tokens=2))])
    spans = exporter.get_finished_spans()
    requests = {s.attributes["gen_ai.request.id"]: s for s in _named(spans, "llm_request")}
    first, second = requests["first"], requests["second"]
    assert first.events[-1].name == "aborted"
    assert first.attributes["gen_ai.response.finish_reasons"] == ("abort",)
    assert first.attributes["gen_ai.usage.cached_tokens"] == 0
    cached = second.attributes["gen_ai.usage.cached_tokens"]
    assert cached > 0 and cached % core.config.block_size == 0
    admitting = next(s for s in _named(spans, "engine.step")
                     if second.context.span_id in {link.context.span_id for link in s.links})
    assert admitting.attributes["engine.prefix_cache.hit_tokens"] == cached


def test_traceparent_parents_the_request_span(traced: Any) -> None:
    core, exporter, _ = traced(kv_cache_bytes=64 * 2**20)
    trace_id, parent_id = "4bf92f3577b34da6a3ce929d0e0e4736", "00f067aa0ba902b7"
    core.add_request(core.make_request(
        "child", "Hello", SamplingParams(max_tokens=2),
        trace_headers={"traceparent": f"00-{trace_id}-{parent_id}-01"}))
    _run(core, [("root", "Hello", SamplingParams(max_tokens=2))])
    requests = {s.attributes["gen_ai.request.id"]: s
                for s in _named(exporter.get_finished_spans(), "llm_request")}
    child = requests["child"]
    assert f"{child.context.trace_id:032x}" == trace_id
    assert child.parent is not None and f"{child.parent.span_id:016x}" == parent_id
    assert requests["root"].parent is None


def test_rate_and_level_sample_requests(smollm: Any) -> None:
    exporter = InMemorySpanExporter()
    provider = TracerProvider()
    provider.add_span_processor(SimpleSpanProcessor(exporter))
    settings = TraceSettings("TIMESTAMPS", rate=3)
    core = EngineCore(EngineConfig(kv_cache_bytes=32 * 2**20), smollm,
                      observers=[EngineTracer(provider, settings, "smollm2", "1")])
    params = SamplingParams(max_tokens=1)
    _run(core, [(f"r{i}", "Hi", params) for i in range(7)])
    traced_ids = [s.attributes["gen_ai.request.id"]
                  for s in _named(exporter.get_finished_spans(), "llm_request")]
    assert sorted(traced_ids) == ["r0", "r3", "r6"]
    exporter.clear()
    settings.level = "OFF"
    _run(core, [("off", "Hi", params)])
    assert exporter.get_finished_spans() == ()


def test_offline_llm_traces_with_a_provider(smollm: Any) -> None:
    exporter = InMemorySpanExporter()
    provider = TracerProvider()
    provider.add_span_processor(SimpleSpanProcessor(exporter))
    llm = LLM(loaded=smollm, kv_cache_bytes=32 * 2**20, tracer_provider=provider)
    llm.generate(["Hello", "Hi"], SamplingParams(max_tokens=3), use_tqdm=False)
    spans = exporter.get_finished_spans()
    assert len(_named(spans, "llm_request")) == 2
    assert len(_named(spans, "engine.step")) == llm.stats().num_steps
    untraced = LLM(loaded=smollm, kv_cache_bytes=32 * 2**20)
    assert untraced.engine._observers == []
