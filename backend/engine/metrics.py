"""Prometheus metrics of the engine, fed from the records the core hands its observers.

The ``vllm:*`` families carry vLLM's names, label names (``model_name``, ``engine``), bucket
boundaries and finish reasons (``vllm/v1/metrics/loggers.py``, ``PrometheusStatLogger``), so
vLLM's dashboards and alerts read them unchanged. ``prometheus_client`` appends ``_total`` to
counters on the wire, exactly as it does for vLLM: ``vllm:prompt_tokens`` is scraped as
``vllm:prompt_tokens_total``. The ``pagedserve_*`` families keep the project's earlier names
(labels ``model``, ``version``).

One ``MetricFamilies`` per registry holds the collectors; every loaded model version gets an
``EngineMetrics`` observer that writes its own label children. vLLM's ``engine`` label is the
index of the engine core that reports; here each loaded version runs its own engine core, so
``engine`` carries the version number and two versions of one model never share a series.

All observer methods run on the engine's core thread, after every step and when a request
ends, so each does a fixed handful of metric updates (plus one ``observe`` per latency the step
completed) and reads nothing but the record it is given.
"""

from __future__ import annotations

import threading
import weakref
from typing import TypeVar

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram
from prometheus_client.metrics import MetricWrapperBase

from pagedserve.engine.stats import FinishedRequest, RequestInfo, StepStats

# vLLM's boundaries (PrometheusStatLogger).
TTFT_BUCKETS = (0.001, 0.005, 0.01, 0.02, 0.04, 0.06, 0.08, 0.1, 0.25, 0.5, 0.75, 1.0, 2.5, 5.0,
                7.5, 10.0, 20.0, 40.0, 80.0, 160.0, 640.0, 2560.0)
ITL_BUCKETS = (0.01, 0.025, 0.05, 0.075, 0.1, 0.15, 0.2, 0.3, 0.4, 0.5, 0.75, 1.0, 2.5, 5.0, 7.5,
               10.0, 20.0, 40.0, 80.0)
REQUEST_LATENCY_BUCKETS = (0.3, 0.5, 0.8, 1.0, 1.5, 2.0, 2.5, 5.0, 10.0, 15.0, 20.0, 30.0, 40.0,
                           50.0, 60.0, 120.0, 240.0, 480.0, 960.0, 1920.0, 7680.0)
ITERATION_TOKEN_BUCKETS = (1, 8, 16, 32, 64, 128, 256, 512, 1024, 2048, 4096, 8192, 16384)
# vLLM sizes its token-count buckets by the model's context; one registry serves every model
# here, so the bound is the longest context the server is expected to load.
DEFAULT_MAX_MODEL_LEN = 131072
# vLLM's finish reasons (FINISH_REASON_STRINGS) that this engine reports; children for them
# exist from the start so a rate() sees the first one.
FINISH_REASONS = ("stop", "length", "abort", "error")

VLLM_LABELS = ("model_name", "engine")
LORA_LABELS = ("max_lora", "waiting_lora_adapters", "running_lora_adapters")
OWN_LABELS = ("model", "version")

_Family = TypeVar("_Family", bound=MetricWrapperBase)


def build_1_2_5_buckets(max_value: int) -> tuple[int, ...]:
    """1, 2, 5, 10, 20, 50, ... up to ``max_value`` (vLLM's token-count buckets)."""
    buckets: list[int] = []
    scale = 1
    while True:
        for mantissa in (1, 2, 5):
            if mantissa * scale > max_value:
                return tuple(buckets)
            buckets.append(mantissa * scale)
        scale *= 10


class MetricFamilies:
    """The engine metric collectors of one registry, shared by every model version.

    Created once per registry (by the server): ``prometheus_client`` refuses a second collector
    of the same name on one registry, and one collector per name is what keeps the models'
    series together under one ``# TYPE`` line.
    """

    def __init__(self, registry: CollectorRegistry,
                 max_model_len: int = DEFAULT_MAX_MODEL_LEN) -> None:
        self.registry = registry
        vllm, own = VLLM_LABELS, OWN_LABELS
        token_buckets = build_1_2_5_buckets(max_model_len)
        # Every family labelled exactly (model_name, engine) or (model, version): what an
        # unloaded version's children are removed from.
        self.vllm_families: list[MetricWrapperBase] = []
        self.own_families: list[MetricWrapperBase] = []

        def add(family: _Family, labels: tuple[str, ...]) -> _Family:
            (self.vllm_families if labels == vllm else self.own_families).append(family)
            return family

        def gauge(name: str, doc: str, labels: tuple[str, ...] = vllm) -> Gauge:
            return add(Gauge(name, doc, labels, registry=registry), labels)

        def counter(name: str, doc: str, labels: tuple[str, ...] = vllm) -> Counter:
            return add(Counter(name, doc, labels, registry=registry), labels)

        def histogram(name: str, doc: str, buckets: tuple[float, ...]) -> Histogram:
            return add(Histogram(name, doc, vllm, registry=registry, buckets=buckets), vllm)

        # Scheduler and cache state after the latest step.
        self.num_requests_running = gauge("vllm:num_requests_running",
                                          "Number of requests in model execution batches.")
        self.num_requests_waiting = gauge("vllm:num_requests_waiting",
                                          "Number of requests waiting to be processed.")
        self.kv_cache_usage_perc = gauge("vllm:kv_cache_usage_perc",
                                         "KV-cache usage. 1 means 100 percent usage.")
        # Counters (``_total`` on the wire).
        self.prefix_cache_queries = counter(
            "vllm:prefix_cache_queries",
            "Prefix cache queries, in terms of number of queried tokens.")
        self.prefix_cache_hits = counter(
            "vllm:prefix_cache_hits", "Prefix cache hits, in terms of number of cached tokens.")
        self.num_preemptions = counter("vllm:num_preemptions",
                                       "Cumulative number of preemption from the engine.")
        self.prompt_tokens = counter("vllm:prompt_tokens", "Number of prefill tokens processed.")
        self.generation_tokens = counter("vllm:generation_tokens",
                                         "Number of generation tokens processed.")
        self.spec_decode_num_draft_tokens = counter("vllm:spec_decode_num_draft_tokens",
                                                    "Number of draft tokens.")
        self.spec_decode_num_accepted_tokens = counter("vllm:spec_decode_num_accepted_tokens",
                                                       "Number of accepted tokens.")
        self.request_success = Counter("vllm:request_success",
                                       "Count of successfully processed requests.",
                                       (*vllm, "finished_reason"), registry=registry)
        # Per-request and per-step histograms.
        self.time_to_first_token = histogram("vllm:time_to_first_token_seconds",
                                             "Histogram of time to first token in seconds.",
                                             TTFT_BUCKETS)
        self.inter_token_latency = histogram("vllm:inter_token_latency_seconds",
                                             "Histogram of inter-token latency in seconds.",
                                             ITL_BUCKETS)
        self.e2e_request_latency = histogram("vllm:e2e_request_latency_seconds",
                                             "Histogram of e2e request latency in seconds.",
                                             REQUEST_LATENCY_BUCKETS)
        self.request_queue_time = histogram(
            "vllm:request_queue_time_seconds",
            "Histogram of time spent in WAITING phase for request.", REQUEST_LATENCY_BUCKETS)
        self.request_inference_time = histogram(
            "vllm:request_inference_time_seconds",
            "Histogram of time spent in RUNNING phase for request.", REQUEST_LATENCY_BUCKETS)
        self.request_prefill_time = histogram(
            "vllm:request_prefill_time_seconds",
            "Histogram of time spent in PREFILL phase for request.", REQUEST_LATENCY_BUCKETS)
        self.request_decode_time = histogram(
            "vllm:request_decode_time_seconds",
            "Histogram of time spent in DECODE phase for request.", REQUEST_LATENCY_BUCKETS)
        self.request_prompt_tokens = histogram("vllm:request_prompt_tokens",
                                               "Number of prefill tokens processed.",
                                               token_buckets)
        self.request_generation_tokens = histogram("vllm:request_generation_tokens",
                                                   "Number of generation tokens processed.",
                                                   token_buckets)
        self.iteration_tokens = histogram("vllm:iteration_tokens_total",
                                          "Histogram of number of tokens per engine_step.",
                                          ITERATION_TOKEN_BUCKETS)
        # vLLM's LoRA gauge: its value the time of the latest update, its labels the adapters
        # of the requests running and waiting (comma-joined names) and max_loras. vLLM labels
        # it with those three only; model_name and engine keep two models' series apart.
        self.lora_requests_info = Gauge("vllm:lora_requests_info",
                                        "Running stats on lora requests.",
                                        (*vllm, *LORA_LABELS), registry=registry)
        # The project's own names, kept for existing scrapers.
        self.kv_blocks_used = gauge("pagedserve_kv_blocks_used", "KV cache blocks in use", own)
        self.requests_running = gauge("pagedserve_requests_running",
                                      "Requests running in the engine", own)
        self.requests_waiting = gauge("pagedserve_requests_waiting",
                                      "Requests waiting in the engine", own)
        self.preemptions = counter("pagedserve_preemptions", "Requests preempted", own)
        self.prefill_tokens = counter("pagedserve_prompt_tokens",
                                      "Prompt tokens computed (prefix-cache hits excluded, "
                                      "recomputation included)", own)
        self.decode_tokens = counter("pagedserve_generation_tokens", "Tokens decoded", own)
        self.engine_steps = counter("pagedserve_engine_steps", "Engine steps run", own)

        # (model, version) -> the observers writing its label children (see release). Weak, so
        # an observer whose engine failed to build (and so never shuts down) drops out.
        self._writers: dict[tuple[str, int], weakref.WeakSet[object]] = {}
        self._lock = threading.Lock()

    def claim(self, model_name: str, version: int, writer: object) -> None:
        """Records that ``writer`` writes the label children of ``model_name`` ``version``."""
        with self._lock:
            self._writers.setdefault((model_name, version), weakref.WeakSet()).add(writer)

    def release(self, model_name: str, version: int, writer: object) -> bool:
        """Forgets ``writer``; True if it was the last one, so the children may go.

        A reload builds the new engine of a version before the old one stops, and both write
        the same label children: the old one must not remove them from under the new one.
        """
        key = (model_name, version)
        with self._lock:
            writers = self._writers.get(key)
            if writers is not None:
                writers.discard(writer)
                if writers:
                    return False
                del self._writers[key]
            return True


class EngineMetrics:
    """An ``EngineObserver`` writing one model version's engine records to Prometheus."""

    def __init__(self, families: MetricFamilies, model_name: str, version: int) -> None:
        self._families = f = families
        self._model_name, self._version = model_name, version
        # Both label sets take the same values: (model_name, engine) and (model, version).
        vllm = own = (model_name, str(version))
        # Children are bound once: an update is then one locked add, no label look-up.
        self._running = f.num_requests_running.labels(*vllm)
        self._waiting = f.num_requests_waiting.labels(*vllm)
        self._kv_usage = f.kv_cache_usage_perc.labels(*vllm)
        self._prefix_queries = f.prefix_cache_queries.labels(*vllm)
        self._prefix_hits = f.prefix_cache_hits.labels(*vllm)
        self._num_preemptions = f.num_preemptions.labels(*vllm)
        self._prompt_tokens = f.prompt_tokens.labels(*vllm)
        self._generation_tokens = f.generation_tokens.labels(*vllm)
        self._draft_tokens = f.spec_decode_num_draft_tokens.labels(*vllm)
        self._accepted_tokens = f.spec_decode_num_accepted_tokens.labels(*vllm)
        self._success = {reason: f.request_success.labels(*vllm, reason)
                         for reason in FINISH_REASONS}
        self._ttft = f.time_to_first_token.labels(*vllm)
        self._itl = f.inter_token_latency.labels(*vllm)
        self._e2e = f.e2e_request_latency.labels(*vllm)
        self._queue = f.request_queue_time.labels(*vllm)
        self._inference = f.request_inference_time.labels(*vllm)
        self._prefill = f.request_prefill_time.labels(*vllm)
        self._decode = f.request_decode_time.labels(*vllm)
        self._request_prompt = f.request_prompt_tokens.labels(*vllm)
        self._request_generation = f.request_generation_tokens.labels(*vllm)
        self._iteration = f.iteration_tokens.labels(*vllm)
        self._blocks_used = f.kv_blocks_used.labels(*own)
        self._own_running = f.requests_running.labels(*own)
        self._own_waiting = f.requests_waiting.labels(*own)
        self._preemptions = f.preemptions.labels(*own)
        self._prefill_tokens = f.prefill_tokens.labels(*own)
        self._decode_tokens = f.decode_tokens.labels(*own)
        self._steps = f.engine_steps.labels(*own)
        # Requests in the engine: when the last one ends outside a step (an abort), no step
        # follows to report the empty engine, so the gauges are zeroed here.
        self._in_flight: set[str] = set()
        # LoRA (``serve_lora``): the adapter of each LoRA request in flight, those of them that
        # have run (vLLM's "running" until preempted), and the gauge child last written.
        self._max_lora: str | None = None
        self._lora_of: dict[str, str] = {}
        self._lora_running: set[str] = set()
        self._lora_labels: tuple[str, ...] | None = None
        f.claim(model_name, version, self)

    def serve_lora(self, max_loras: int) -> None:
        """The engine serves LoRA adapters: ``vllm:lora_requests_info`` is written from now."""
        self._max_lora = str(max_loras)
        self._update_lora()

    def on_request_added(self, request: RequestInfo) -> None:
        self._in_flight.add(request.request_id)
        if request.lora_name is not None:
            self._lora_of[request.request_id] = request.lora_name

    def on_step(self, stats: StepStats) -> None:
        self._running.set(stats.num_running)
        self._waiting.set(stats.num_waiting)
        self._own_running.set(stats.num_running)
        self._own_waiting.set(stats.num_waiting)
        self._blocks_used.set(stats.num_blocks_used)
        if stats.num_blocks_total:
            self._kv_usage.set(stats.num_blocks_used / stats.num_blocks_total)
        self._prefix_queries.inc(stats.prefix_cache_queried_tokens)
        self._prefix_hits.inc(stats.prefix_cache_hit_tokens)
        self._num_preemptions.inc(stats.num_preempted)
        self._preemptions.inc(stats.num_preempted)
        self._generation_tokens.inc(stats.num_generated_tokens)
        self._draft_tokens.inc(stats.num_draft_tokens)
        self._accepted_tokens.inc(stats.num_accepted_tokens)
        self._prefill_tokens.inc(stats.num_prefill_tokens)
        self._decode_tokens.inc(stats.num_decode_tokens)
        self._steps.inc()
        self._iteration.observe(stats.num_tokens)
        for ttft in stats.time_to_first_token_s:
            self._ttft.observe(ttft)
        for itl in stats.inter_token_latency_s:
            self._itl.observe(itl)
        if self._max_lora is not None:
            lora_of = self._lora_of
            self._lora_running.update(r for r in stats.request_ids if r in lora_of)
            self._lora_running.difference_update(stats.preempted_request_ids)
            self._update_lora()

    def on_request_finished(self, request: FinishedRequest) -> None:
        for reason in request.finish_reasons:
            child = self._success.get(reason)
            if child is None:  # a reason this engine did not report before: still counted
                child = self._success[reason] = self._families.request_success.labels(
                    self._model_name, str(self._version), reason)
            child.inc()
        e2e = request.e2e_s
        self._e2e.observe(e2e)
        # A request that never ran spent its whole life waiting.
        queue = request.queue_s
        self._queue.observe(e2e if queue is None else queue)
        if request.first_scheduled_ns is not None:
            self._inference.observe((request.finished_ns - request.first_scheduled_ns) / 1e9)
        prefill, decode = request.prefill_s, request.decode_s
        if prefill is not None:
            self._prefill.observe(prefill)
        if decode is not None:
            self._decode.observe(decode)
        # vLLM counts a prompt once its prefill produced the first token; the step records do
        # not say whose first token came, so the prompt is counted when its request ends.
        if request.first_token_ns is not None:
            self._prompt_tokens.inc(request.num_prompt_tokens)
        self._request_prompt.observe(request.num_prompt_tokens)
        self._request_generation.observe(request.num_generation_tokens)
        self._in_flight.discard(request.request_id)
        if self._lora_of.pop(request.request_id, None) is not None:
            self._lora_running.discard(request.request_id)
            self._update_lora()
        if not self._in_flight:
            self._zero_gauges()

    def _update_lora(self) -> None:
        """Sets ``vllm:lora_requests_info`` to now, under the labels of the adapters running
        and waiting; the series of the previous labels goes (vLLM's would stay, each with the
        time it was last current: the newest is the one that counts)."""
        if self._max_lora is None:
            return
        running = {self._lora_of[r] for r in self._lora_running}
        waiting = {name for r, name in self._lora_of.items() if r not in self._lora_running}
        labels = (self._model_name, str(self._version), self._max_lora,
                  ",".join(sorted(waiting)), ",".join(sorted(running)))
        gauge = self._families.lora_requests_info
        if self._lora_labels is not None and labels != self._lora_labels:
            gauge.remove(*self._lora_labels)
        self._lora_labels = labels
        gauge.labels(*labels).set_to_current_time()

    def shutdown(self) -> None:
        """Removes this version's series, so a model that is gone does not linger on the page."""
        if not self._families.release(self._model_name, self._version, self):
            return  # another engine of this version (a reload) writes the same series
        f = self._families
        labels = (self._model_name, str(self._version))  # both label sets take these values
        for family in (*f.vllm_families, *f.own_families):
            family.remove(*labels)
        for reason in self._success:
            f.request_success.remove(*labels, reason)
        if self._lora_labels is not None:
            f.lora_requests_info.remove(*self._lora_labels)
            self._lora_labels = None

    def _zero_gauges(self) -> None:
        for gauge in (self._running, self._waiting, self._kv_usage, self._own_running,
                      self._own_waiting, self._blocks_used):
            gauge.set(0)
