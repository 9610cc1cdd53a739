"""Engine gauges on Triton's metrics port, through the Python backend's custom metrics API.

Inside Triton our own ``/metrics`` does not run; Triton's ``pb_utils.MetricFamily`` puts these
gauges on its own Prometheus endpoint (port 8002) beside ``nv_inference_*``, with vLLM's names
and the labels of Triton's vLLM backend (``model``, ``version``) plus ``instance``: each model
instance has an engine of its own, so each writes (and on unload removes) its own series. Every
update is a message to the Triton process, so a gauge is set only when its value changes.
"""

from __future__ import annotations

from typing import Any

from pagedserve.engine.stats import FinishedRequest, RequestInfo, StepStats

# name -> description; the gauges of pagedserve.engine.metrics that say what the engine holds.
GAUGES = {
    "vllm:num_requests_running": "Number of requests in model execution batches.",
    "vllm:num_requests_waiting": "Number of requests waiting to be processed.",
    "vllm:kv_cache_usage_perc": "KV-cache usage. 1 means 100 percent usage.",
    "pagedserve_kv_blocks_used": "KV cache blocks in use",
}


class TritonEngineGauges:
    """An ``EngineObserver`` writing one model version's engine gauges to Triton's metrics."""

    def __init__(self, pb_utils: Any, model: str, version: str, instance: str) -> None:
        labels = {"model": model, "version": version, "instance": instance}
        self._families = [pb_utils.MetricFamily(name=name, description=text,
                                                kind=pb_utils.MetricFamily.GAUGE)
                          for name, text in GAUGES.items()]
        self._metrics = [family.Metric(labels=labels) for family in self._families]
        self._values: list[float] = [0.0] * len(self._metrics)
        # Requests in the engine: when the last one ends outside a step (an abort), no step
        # follows to report the empty engine, so the gauges are zeroed then.
        self._in_flight: set[str] = set()

    def _set(self, values: tuple[float, ...]) -> None:
        for i, value in enumerate(values):
            if value != self._values[i]:
                self._metrics[i].set(value)
                self._values[i] = value

    def on_request_added(self, request: RequestInfo) -> None:
        self._in_flight.add(request.request_id)

    def on_step(self, stats: StepStats) -> None:
        total = stats.num_blocks_total
        self._set((stats.num_running, stats.num_waiting,
                   stats.num_blocks_used / total if total else 0.0, stats.num_blocks_used))

    def on_request_finished(self, request: FinishedRequest) -> None:
        self._in_flight.discard(request.request_id)
        if not self._in_flight:
            self._set((0, 0, 0.0, 0))

    def shutdown(self) -> None:
        """Nothing buffered; the families go with the model's stub process."""
