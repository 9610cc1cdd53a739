"""``/metrics``: one ``prometheus_client`` registry, rendered by ``generate_latest``.

Two sources feed it. Engine numbers come from ``EngineMetrics`` observers, which the engine
core calls on its own thread (``metrics_observers`` builds them for the repository); the HTTP
thread never runs engine code. Triton's ``nv_inference_*`` counters come from the repository's
per-version ``ModelStats`` through ``RepositoryCollector``, which snapshots them at scrape time.

The server wires it once::

    registry = CollectorRegistry()
    families = MetricFamilies(registry)
    repository = ModelRepository(..., observer_factory=metrics_observers(families))
    registry.register(RepositoryCollector(repository))
    HttpEndpoint(..., registry)
"""

from __future__ import annotations

from collections.abc import Callable, Iterator

from prometheus_client import CONTENT_TYPE_LATEST, CollectorRegistry, generate_latest
from prometheus_client.core import GaugeMetricFamily, Metric

from pagedserve.engine.metrics import EngineMetrics, MetricFamilies
from pagedserve.engine.stats import EngineObserver
from pagedserve.repository import ModelRepository

__all__ = ["CONTENT_TYPE_LATEST", "MetricFamilies", "RepositoryCollector", "metrics_observers",
           "render"]

# Triton's counters: (name, help, ModelStats phase, whether the value is the phase's duration).
_PHASE_COUNTERS = (
    ("nv_inference_request_success", "Number of successful inference requests", "success",
     False),
    ("nv_inference_request_failure", "Number of failed inference requests", "fail", False),
    ("nv_inference_request_duration_us",
     "Cumulative inference request duration in microseconds", "success", True),
    ("nv_inference_queue_duration_us", "Cumulative inference queuing duration in microseconds",
     "queue", True),
    ("nv_inference_compute_input_duration_us",
     "Cumulative compute input duration in microseconds", "compute_input", True),
    ("nv_inference_compute_infer_duration_us",
     "Cumulative compute inference duration in microseconds", "compute_infer", True),
    ("nv_inference_compute_output_duration_us",
     "Cumulative inference compute output duration in microseconds", "compute_output", True),
)
_COUNTS = (("nv_inference_count", "Number of inferences performed"),
           ("nv_inference_exec_count", "Number of model executions performed"))
_LABELS = ("model", "version")


def _untyped(name: str, documentation: str) -> Metric:
    # Triton names its counters without ``_total``, and prometheus_client's text format adds
    # ``_total`` to every counter; to keep Triton's names (its dashboards, our clients) they
    # go out untyped, which PromQL's rate() reads all the same.
    return Metric(name, documentation, "unknown")


class RepositoryCollector:
    """Triton's per-version counters, and each version's KV-cache size, at scrape time.

    Runs on the HTTP thread: it reads ``ModelStats`` snapshots (taken under their lock) and
    each engine's ``limits``, frozen when the engine was built. Only READY versions appear, so
    an unloaded model's series go with it.
    """

    def __init__(self, repository: ModelRepository) -> None:
        self._repository = repository

    def describe(self) -> Iterator[Metric]:
        """The names it serves, so the registry refuses a collector that would clash."""
        for name, documentation, _, _ in _PHASE_COUNTERS:
            yield _untyped(name, documentation)
        for name, documentation in _COUNTS:
            yield _untyped(name, documentation)
        yield GaugeMetricFamily("pagedserve_kv_blocks_total",
                                "KV cache blocks usable by requests", labels=_LABELS)

    def collect(self) -> Iterator[Metric]:
        models = self._repository.all_ready()
        snapshots = [((m.name, str(m.version)), m.stats.snapshot()) for m in models]
        for name, documentation, phase, duration in _PHASE_COUNTERS:
            metric = _untyped(name, documentation)
            for labels, (durations, _, _, _) in snapshots:
                d = durations[phase]
                metric.add_sample(name, dict(zip(_LABELS, labels)),
                                  d.ns // 1000 if duration else d.count)
            yield metric
        for index, (name, documentation) in enumerate(_COUNTS):
            metric = _untyped(name, documentation)
            for labels, (_, inferences, executions, _) in snapshots:
                metric.add_sample(name, dict(zip(_LABELS, labels)),
                                  (inferences, executions)[index])
            yield metric
        # A constant of the engine, so it is right before the first step reports anything.
        blocks = GaugeMetricFamily("pagedserve_kv_blocks_total",
                                   "KV cache blocks usable by requests", labels=_LABELS)
        for m in models:
            blocks.add_metric([m.name, str(m.version)], m.engine.limits.num_usable_blocks)
        yield blocks


def metrics_observers(families: MetricFamilies) -> Callable[[str, int], list[EngineObserver]]:
    """The repository's observer factory for metrics: one ``EngineMetrics`` per version."""
    def observers(model_name: str, version: int) -> list[EngineObserver]:
        return [EngineMetrics(families, model_name, version)]
    return observers


def render(registry: CollectorRegistry) -> bytes:
    """The whole metrics page, in the Prometheus text format (``CONTENT_TYPE_LATEST``)."""
    return generate_latest(registry)
