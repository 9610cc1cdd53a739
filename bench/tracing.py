"""What tracing costs: the throughput workload with every step and request traced, against
tracing off, in one run (``python -m pagedserve.bench.throughput --tracing``).

Two engines share the weights: one untraced, one reporting to an OpenTelemetry SDK provider
whose batch span processor exports over OTLP/gRPC to a receiver in another process on
loopback (as a collector would be). Runs alternate off/on so drift hits both alike; each side's
fastest run counts. The result is the traced throughput as a fraction of the untraced one, and
the spans the receiver got (every step and every request must arrive).
"""

from __future__ import annotations

import subprocess
import sys
import time
from dataclasses import dataclass
from typing import Any

from opentelemetry.exporter.otlp.proto.grpc.trace_exporter import OTLPSpanExporter
from opentelemetry.sdk.resources import Resource
from opentelemetry.sdk.trace import TracerProvider
from opentelemetry.sdk.trace.export import BatchSpanProcessor

from pagedserve import LLM

# The receiver process: prints its gRPC endpoint, then the spans received per "count" line.
_SINK = """
import sys
from tests.otlp_receiver import OtlpReceiver
with OtlpReceiver() as receiver:
    print(receiver.grpc_endpoint, flush=True)
    for line in sys.stdin:
        print(len(receiver.spans()), flush=True)
"""


@dataclass
class TracingOverhead:
    untraced_tok_s: float
    traced_tok_s: float
    untraced_walls_s: list[float]
    traced_walls_s: list[float]
    spans_received: int
    spans_expected: int  # steps x 5 (a step and its four phases) + requests

    @property
    def overhead(self) -> float:
        return 1.0 - self.traced_tok_s / self.untraced_tok_s


class _Sink:
    def __init__(self) -> None:
        self.process = subprocess.Popen([sys.executable, "-c", _SINK], stdin=subprocess.PIPE,
                                        stdout=subprocess.PIPE, text=True)
        assert self.process.stdout is not None
        self.endpoint = self.process.stdout.readline().strip()

    def count(self) -> int:
        assert self.process.stdin is not None and self.process.stdout is not None
        self.process.stdin.write("count\n")
        self.process.stdin.flush()
        return int(self.process.stdout.readline())

    def close(self) -> None:
        assert self.process.stdin is not None
        self.process.stdin.close()
        self.process.wait(30)


def measure(engine_args: dict[str, Any], requests: list[Any], warmup: list[Any], repeat: int,
            generate: Any) -> TracingOverhead:
    """``generate(llm, requests)`` runs the workload; returns both sides' best throughput."""
    sink = _Sink()
    try:
        provider = TracerProvider(resource=Resource.create({"service.name": "bench"}))
        provider.add_span_processor(BatchSpanProcessor(OTLPSpanExporter(endpoint=sink.endpoint)))
        plain = LLM(**engine_args)
        traced = LLM(tracer_provider=provider, **engine_args)
        generate(plain, warmup)
        generate(traced, warmup)
        provider.force_flush()
        before = sink.count()
        steps_before = traced.stats().num_steps
        walls: dict[str, list[float]] = {"off": [], "on": []}
        for _ in range(repeat):
            for name, llm in (("off", plain), ("on", traced)):
                if not llm.reset_prefix_cache():
                    raise RuntimeError("the engine still holds KV blocks between runs")
                start = time.perf_counter()
                generate(llm, requests)
                walls[name].append(time.perf_counter() - start)
                print(f"tracing {name}: {walls[name][-1]:.2f} s", flush=True)
        provider.force_flush()
        received = sink.count() - before
        steps = traced.stats().num_steps - steps_before
        provider.shutdown()
    finally:
        sink.close()
    tokens = sum(r.output_len for r in requests)
    return TracingOverhead(
        untraced_tok_s=tokens / min(walls["off"]), traced_tok_s=tokens / min(walls["on"]),
        untraced_walls_s=walls["off"], traced_walls_s=walls["on"],
        spans_received=received, spans_expected=5 * steps + repeat * len(requests))
