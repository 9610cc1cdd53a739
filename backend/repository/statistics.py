"""Per model-version inference statistics, in the shape of Triton's ``ModelStatistics``.

How an LLM request's life maps onto Triton's phases (perf_analyzer reads these):

* ``compute_input``: decoding the request's tensors into an engine request;
* ``queue``: from submission to the engine until its first output (waiting + first prefill);
* ``compute_infer``: from the first output until the request finished;
* ``compute_output``: time spent building response tensors;
* ``success`` / ``fail``: the whole request, receipt to last response (or error).

Every request counts one inference and one execution (the engine batches continuously, so
there are no Triton-style batches to count).

As in Triton, a request's statistics are recorded all at once when it ends (``record``), so
every snapshot has ``queue``, ``compute_input``, ``compute_infer`` and ``compute_output`` counts
equal: perf_analyzer reads the statistics mid-run and aborts when the compute counts differ. A
request that never ran (rejected, or cancelled before its first output) counts in ``fail`` only.
"""

from __future__ import annotations

import threading
import time
from dataclasses import dataclass, field

PHASES = ("success", "fail", "queue", "compute_input", "compute_infer", "compute_output")


@dataclass
class Duration:
    count: int = 0
    ns: int = 0


@dataclass
class ModelStats:
    """Counters of one model version; updated from the event loop, read by the HTTP thread."""

    durations: dict[str, Duration] = field(
        default_factory=lambda: {phase: Duration() for phase in PHASES})
    inference_count: int = 0
    execution_count: int = 0
    last_inference_ms: int = 0
    lock: threading.Lock = field(default_factory=threading.Lock, repr=False)

    def record(self, ok: bool, total_ns: int, phases: dict[str, int] | None = None) -> None:
        """Records a finished request (successful or failed) in one step.

        ``phases`` (``queue``/``compute_*`` durations in ns) is given when the request ran; each
        phase then counts once, zero-length ones too, so their counts always agree.
        """
        with self.lock:
            for phase, ns in (phases or {}).items():
                d = self.durations[phase]
                d.count += 1
                d.ns += max(ns, 0)
            d = self.durations["success" if ok else "fail"]
            d.count += 1
            d.ns += max(total_ns, 0)
            if ok:
                self.inference_count += 1
                self.execution_count += 1
            self.last_inference_ms = int(time.time() * 1000)

    def snapshot(self) -> tuple[dict[str, Duration], int, int, int]:
        with self.lock:
            return ({k: Duration(v.count, v.ns) for k, v in self.durations.items()},
                    self.inference_count, self.execution_count, self.last_inference_ms)
