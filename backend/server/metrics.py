"""Prometheus text for ``/metrics``: Triton's ``nv_inference_*`` counters and engine gauges.

Written by hand (the exposition format is a few lines) to avoid a dependency; read from the HTTP
thread, so it only takes snapshots (``ModelStats`` under its lock, ``EngineStats`` ints).
"""

from __future__ import annotations

from backend.repository import ModelRepository

_COUNTERS = [
    ("nv_inference_request_success", "Number of successful inference requests", "success", None),
    ("nv_inference_request_failure", "Number of failed inference requests", "fail", None),
    ("nv_inference_request_duration_us", "Cumulative inference request duration in microseconds",
     "success", "ns"),
    ("nv_inference_queue_duration_us", "Cumulative inference queuing duration in microseconds",
     "queue", "ns"),
    ("nv_inference_compute_input_duration_us",
     "Cumulative compute input duration in microseconds", "compute_input", "ns"),
    ("nv_inference_compute_infer_duration_us",
     "Cumulative compute inference duration in microseconds", "compute_infer", "ns"),
    ("nv_inference_compute_output_duration_us",
     "Cumulative inference compute output duration in microseconds", "compute_output", "ns"),
]
_ENGINE = [
    ("pagedserve_kv_blocks_total", "gauge", "KV cache blocks usable by requests",
     "num_blocks_total"),
    ("pagedserve_kv_blocks_used", "gauge", "KV cache blocks in use", "num_blocks_used"),
    ("pagedserve_requests_running", "gauge", "Sequences running in the engine", "num_running"),
    ("pagedserve_requests_waiting", "gauge", "Sequences waiting in the engine", "num_waiting"),
    ("pagedserve_preemptions_total", "counter", "Sequences preempted", "num_preemptions"),
    ("pagedserve_prompt_tokens_total", "counter", "Prompt tokens prefilled",
     "num_prefilled_tokens"),
    ("pagedserve_generation_tokens_total", "counter", "Tokens decoded", "num_decoded_tokens"),
    ("pagedserve_engine_steps_total", "counter", "Engine steps run", "num_steps"),
]


def render(repository: ModelRepository) -> str:
    """The whole metrics page."""
    models = repository.all_ready()
    lines: list[str] = []
    snapshots = [(m, m.stats.snapshot()) for m in models]
    for name, help_text, phase, unit in _COUNTERS:
        lines += [f"# HELP {name} {help_text}", f"# TYPE {name} counter"]
        for model, (durations, _, _, _) in snapshots:
            value = durations[phase].ns // 1000 if unit else durations[phase].count
            lines.append(f'{name}{{model="{model.name}",version="{model.version}"}} {value}')
    for name, help_text, index in (("nv_inference_count", "Number of inferences performed", 1),
                                   ("nv_inference_exec_count",
                                    "Number of model executions performed", 2)):
        lines += [f"# HELP {name} {help_text}", f"# TYPE {name} counter"]
        for model, snapshot in snapshots:
            lines.append(f'{name}{{model="{model.name}",version="{model.version}"}} '
                         f"{snapshot[index]}")
    engine_stats = [(m, m.engine.stats()) for m in models]
    for name, kind, help_text, attribute in _ENGINE:
        lines += [f"# HELP {name} {help_text}", f"# TYPE {name} {kind}"]
        for model, stats in engine_stats:
            lines.append(f'{name}{{model="{model.name}",version="{model.version}"}} '
                         f"{getattr(stats, attribute)}")
    return "\n".join(lines) + "\n"
