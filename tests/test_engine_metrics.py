"""``EngineMetrics`` fed synthetic engine records: names, labels, buckets and arithmetic."""

from __future__ import annotations

import gc
from dataclasses import replace

import pytest
from prometheus_client import CollectorRegistry, generate_latest
from prometheus_client.parser import text_string_to_metric_families

from pagedserve.engine.metrics import (
    FINISH_REASONS,
    ITL_BUCKETS,
    REQUEST_LATENCY_BUCKETS,
    TTFT_BUCKETS,
    EngineMetrics,
    MetricFamilies,
    build_1_2_5_buckets,
)
from pagedserve.engine.stats import EngineObserver, FinishedRequest, RequestInfo, StepStats

S = 1_000_000_000  # ns per second

STEP = StepStats(step=1, start_ns=0, scheduled_ns=1, forwarded_ns=2, sampled_ns=3, end_ns=4,
                 num_running=0, num_waiting=0, num_preempted=0, num_prefill_tokens=0,
                 num_decode_tokens=0, num_scheduled_seqs=0, num_generated_tokens=0,
                 num_blocks_used=0, num_blocks_free=100, num_blocks_cached=0,
                 num_blocks_total=100, prefix_cache_queried_tokens=0, prefix_cache_hit_tokens=0,
                 num_cow_copies=0, num_evictions=0, request_ids=())


def info(request_id: str, prompt: int = 10) -> RequestInfo:
    return RequestInfo(request_id, 0, prompt, 16, 0.0, 1.0, 1)


def finished(request_id: str, reasons: tuple[str, ...] = ("length",), prompt: int = 10,
             generated: int = 4, scheduled_s: float | None = 0.5,
             first_token_s: float | None = 1.0, finished_s: float = 3.0) -> FinishedRequest:
    def ns(s: float | None) -> int | None:
        return None if s is None else int(s * S)
    return FinishedRequest(request_id, arrival_ns=0, first_scheduled_ns=ns(scheduled_s),
                           first_token_ns=ns(first_token_s), finished_ns=int(finished_s * S),
                           preemption_ns=(), num_prompt_tokens=prompt,
                           num_generation_tokens=generated, finish_reasons=reasons)


class Page:
    """The registry's text page, parsed back: sample values by name and labels."""

    def __init__(self, registry: CollectorRegistry) -> None:
        text = generate_latest(registry).decode()
        self.families = {f.name: f for f in text_string_to_metric_families(text)}
        self.samples = {(s.name, frozenset(s.labels.items())): s.value
                        for f in self.families.values() for s in f.samples}

    def get(self, name: str, **labels: str) -> float:
        return self.samples[(name, frozenset(labels.items()))]

    def has(self, name: str, **labels: str) -> bool:
        return (name, frozenset(labels.items())) in self.samples


VLLM = {"model_name": "m", "engine": "1"}
OWN = {"model": "m", "version": "1"}


@pytest.fixture
def registry() -> CollectorRegistry:
    return CollectorRegistry()


@pytest.fixture
def families(registry: CollectorRegistry) -> MetricFamilies:
    return MetricFamilies(registry, max_model_len=8192)


@pytest.fixture
def observer(families: MetricFamilies) -> EngineMetrics:
    return EngineMetrics(families, "m", 1)


def test_is_an_engine_observer(observer: EngineMetrics) -> None:
    typed: EngineObserver = observer  # mypy checks the protocol; this checks it at all
    assert callable(typed.on_step)


def test_wire_names_are_vllms(registry: CollectorRegistry, observer: EngineMetrics) -> None:
    page = Page(registry)
    # prometheus_client appends _total to counters on the wire, as for vLLM.
    for name in ("vllm:prefix_cache_queries_total", "vllm:prefix_cache_hits_total",
                 "vllm:num_preemptions_total", "vllm:prompt_tokens_total",
                 "vllm:generation_tokens_total", "vllm:num_requests_running",
                 "vllm:num_requests_waiting", "vllm:kv_cache_usage_perc"):
        assert page.has(name, **VLLM), name
    for reason in FINISH_REASONS:
        assert page.get("vllm:request_success_total", **VLLM, finished_reason=reason) == 0
    for name in ("vllm:time_to_first_token_seconds", "vllm:inter_token_latency_seconds",
                 "vllm:e2e_request_latency_seconds", "vllm:request_queue_time_seconds",
                 "vllm:request_prompt_tokens", "vllm:request_generation_tokens",
                 "vllm:iteration_tokens_total"):
        assert page.families[name].type == "histogram"
        assert page.get(name + "_count", **VLLM) == 0
    for name in ("pagedserve_kv_blocks_used", "pagedserve_requests_running",
                 "pagedserve_requests_waiting", "pagedserve_preemptions_total",
                 "pagedserve_prompt_tokens_total", "pagedserve_generation_tokens_total",
                 "pagedserve_engine_steps_total"):
        assert page.has(name, **OWN), name


def _bounds(page: Page, name: str) -> list[float]:
    return [float(s.labels["le"]) for s in page.families[name].samples
            if s.name == name + "_bucket" and s.labels["le"] != "+Inf"]


def test_buckets_are_vllms(registry: CollectorRegistry, observer: EngineMetrics) -> None:
    page = Page(registry)
    assert _bounds(page, "vllm:time_to_first_token_seconds") == list(TTFT_BUCKETS)
    assert TTFT_BUCKETS[:3] == (0.001, 0.005, 0.01) and TTFT_BUCKETS[-1] == 2560.0
    assert _bounds(page, "vllm:inter_token_latency_seconds") == list(ITL_BUCKETS)
    assert ITL_BUCKETS[0] == 0.01 and ITL_BUCKETS[-1] == 80.0 and len(ITL_BUCKETS) == 19
    assert _bounds(page, "vllm:e2e_request_latency_seconds") == list(REQUEST_LATENCY_BUCKETS)
    assert REQUEST_LATENCY_BUCKETS[-1] == 7680.0 and len(REQUEST_LATENCY_BUCKETS) == 21
    assert _bounds(page, "vllm:iteration_tokens_total") == [
        1, 8, 16, 32, 64, 128, 256, 512, 1024, 2048, 4096, 8192, 16384]
    assert _bounds(page, "vllm:request_prompt_tokens") == [
        1, 2, 5, 10, 20, 50, 100, 200, 500, 1000, 2000, 5000]


def test_build_1_2_5_buckets() -> None:
    assert build_1_2_5_buckets(100) == (1, 2, 5, 10, 20, 50, 100)
    assert build_1_2_5_buckets(1) == (1,)
    assert build_1_2_5_buckets(4) == (1, 2)


def test_step_updates(registry: CollectorRegistry, observer: EngineMetrics) -> None:
    observer.on_request_added(info("a"))
    observer.on_step(replace(STEP, num_running=3, num_waiting=2, num_preempted=1,
                             num_prefill_tokens=40, num_decode_tokens=2,
                             num_generated_tokens=5, num_blocks_used=25,
                             prefix_cache_queried_tokens=64, prefix_cache_hit_tokens=32,
                             time_to_first_token_s=(0.003, 0.2),
                             inter_token_latency_s=(0.02, 0.02, 0.5)))
    observer.on_step(replace(STEP, num_running=1, num_decode_tokens=1, num_generated_tokens=1,
                             num_blocks_used=10, inter_token_latency_s=(0.03,)))
    page = Page(registry)
    assert page.get("vllm:num_requests_running", **VLLM) == 1
    assert page.get("vllm:num_requests_waiting", **VLLM) == 0
    assert page.get("vllm:kv_cache_usage_perc", **VLLM) == pytest.approx(0.10)
    assert page.get("pagedserve_kv_blocks_used", **OWN) == 10
    assert page.get("pagedserve_requests_running", **OWN) == 1
    assert page.get("vllm:prefix_cache_queries_total", **VLLM) == 64
    assert page.get("vllm:prefix_cache_hits_total", **VLLM) == 32
    assert page.get("vllm:num_preemptions_total", **VLLM) == 1
    assert page.get("pagedserve_preemptions_total", **OWN) == 1
    assert page.get("vllm:generation_tokens_total", **VLLM) == 6
    assert page.get("pagedserve_prompt_tokens_total", **OWN) == 40
    assert page.get("pagedserve_generation_tokens_total", **OWN) == 3
    assert page.get("pagedserve_engine_steps_total", **OWN) == 2
    assert page.get("vllm:iteration_tokens_total_count", **VLLM) == 2
    assert page.get("vllm:iteration_tokens_total_sum", **VLLM) == 43
    assert page.get("vllm:time_to_first_token_seconds_count", **VLLM) == 2
    assert page.get("vllm:time_to_first_token_seconds_bucket", **VLLM, le="0.005") == 1
    assert page.get("vllm:inter_token_latency_seconds_count", **VLLM) == 4
    assert page.get("vllm:inter_token_latency_seconds_sum", **VLLM) == pytest.approx(0.57)
    # Prompts count when their request ends (see on_request_finished), not per step.
    assert page.get("vllm:prompt_tokens_total", **VLLM) == 0


def test_finished_requests(registry: CollectorRegistry, observer: EngineMetrics) -> None:
    for rid in "abcd":
        observer.on_request_added(info(rid))
    observer.on_request_finished(finished("a", ("length",), prompt=7, generated=4))
    observer.on_request_finished(finished("b", ("stop", "length"), prompt=5, generated=9))
    # Aborted while waiting: never scheduled, no first token, no prompt counted.
    observer.on_request_finished(finished("c", ("abort",), prompt=11, generated=0,
                                          scheduled_s=None, first_token_s=None,
                                          finished_s=2.0))
    observer.on_request_finished(finished("d", ("error",), prompt=3, generated=1))
    page = Page(registry)
    success = {r: page.get("vllm:request_success_total", **VLLM, finished_reason=r)
               for r in FINISH_REASONS}
    assert success == {"stop": 1, "length": 2, "abort": 1, "error": 1}
    assert page.get("vllm:prompt_tokens_total", **VLLM) == 7 + 5 + 3
    assert page.get("vllm:e2e_request_latency_seconds_count", **VLLM) == 4
    assert page.get("vllm:e2e_request_latency_seconds_sum", **VLLM) == pytest.approx(11.0)
    # Queue time: 0.5 s for the three that ran; all of its 2 s for the one that never did.
    assert page.get("vllm:request_queue_time_seconds_count", **VLLM) == 4
    assert page.get("vllm:request_queue_time_seconds_sum", **VLLM) == pytest.approx(3.5)
    assert page.get("vllm:request_prefill_time_seconds_sum", **VLLM) == pytest.approx(1.5)
    assert page.get("vllm:request_decode_time_seconds_sum", **VLLM) == pytest.approx(6.0)
    assert page.get("vllm:request_inference_time_seconds_count", **VLLM) == 3
    assert page.get("vllm:request_prompt_tokens_count", **VLLM) == 4
    assert page.get("vllm:request_prompt_tokens_sum", **VLLM) == 26
    assert page.get("vllm:request_generation_tokens_sum", **VLLM) == 14
    assert page.get("vllm:request_generation_tokens_bucket", **VLLM, le="5.0") == 3


def test_unknown_finish_reason_is_counted(registry: CollectorRegistry,
                                          observer: EngineMetrics) -> None:
    observer.on_request_finished(finished("a", ("repetition",)))
    page = Page(registry)
    assert page.get("vllm:request_success_total", **VLLM, finished_reason="repetition") == 1
    observer.shutdown()
    assert not Page(registry).has("vllm:request_success_total", **VLLM,
                                  finished_reason="repetition")


def test_gauges_zero_when_the_last_request_ends_outside_a_step(
        registry: CollectorRegistry, observer: EngineMetrics) -> None:
    observer.on_request_added(info("a"))
    observer.on_request_added(info("b"))
    observer.on_step(replace(STEP, num_running=1, num_waiting=1, num_blocks_used=30))
    observer.on_request_finished(finished("a", ("abort",)))  # aborted: no step follows
    page = Page(registry)
    assert page.get("vllm:num_requests_running", **VLLM) == 1  # b is still in the engine
    observer.on_request_finished(finished("b", ("abort",)))
    page = Page(registry)
    for name in ("vllm:num_requests_running", "vllm:num_requests_waiting",
                 "vllm:kv_cache_usage_perc"):
        assert page.get(name, **VLLM) == 0, name
    for name in ("pagedserve_kv_blocks_used", "pagedserve_requests_running",
                 "pagedserve_requests_waiting"):
        assert page.get(name, **OWN) == 0, name


def test_models_share_a_registry_and_unload_alone(registry: CollectorRegistry,
                                                  families: MetricFamilies,
                                                  observer: EngineMetrics) -> None:
    other = EngineMetrics(families, "other", 2)
    observer.on_step(replace(STEP, num_generated_tokens=3))
    other.on_step(replace(STEP, num_generated_tokens=5))
    page = Page(registry)
    assert page.get("vllm:generation_tokens_total", **VLLM) == 3
    assert page.get("vllm:generation_tokens_total", model_name="other", engine="2") == 5
    other.shutdown()
    page = Page(registry)
    assert page.get("vllm:generation_tokens_total", **VLLM) == 3
    gone = [key for key in page.samples if ("model_name", "other") in key[1]
            or ("model", "other") in key[1]]
    assert gone == []


def test_reload_keeps_the_new_engines_series(registry: CollectorRegistry,
                                             families: MetricFamilies,
                                             observer: EngineMetrics) -> None:
    """A reload builds the new engine of a version before the old one stops."""
    observer.on_step(replace(STEP, num_generated_tokens=3))
    new = EngineMetrics(families, "m", 1)
    observer.shutdown()  # the old engine stops after the new one is in place
    new.on_step(replace(STEP, num_generated_tokens=2))
    page = Page(registry)
    assert page.get("vllm:generation_tokens_total", **VLLM) == 5  # one continuing series
    new.shutdown()
    assert not Page(registry).has("vllm:generation_tokens_total", **VLLM)


def test_an_engine_that_failed_to_build_does_not_pin_the_series(
        registry: CollectorRegistry, families: MetricFamilies, observer: EngineMetrics) -> None:
    """A failed reload drops its observers without shutting them down."""
    failed = EngineMetrics(families, "m", 1)
    del failed
    gc.collect()
    observer.shutdown()
    assert not Page(registry).has("vllm:generation_tokens_total", **VLLM)


def test_second_families_on_one_registry_is_refused(registry: CollectorRegistry,
                                                    families: MetricFamilies) -> None:
    with pytest.raises(ValueError, match="Duplicated timeseries"):
        MetricFamilies(registry)
