"""Triton's per-request statistics of one request, whichever door it came through.

Triton records a request when it is released, all phases at once: its input processing
(``compute_input``), the time from its submission to its first output (``queue``), from then to
its end (``compute_infer``) and the time spent building responses (``compute_output``). A request
refused before it reached the engine counts as a failure with no phases.
"""

from __future__ import annotations

import time
from collections.abc import Iterator
from contextlib import contextmanager

from pagedserve.repository.statistics import ModelStats


class RequestAccount:
    def __init__(self, stats: ModelStats) -> None:
        self._stats = stats
        self._t0 = time.monotonic_ns()
        self._input_ns = 0
        self._output_ns = 0
        self._submitted_ns: int | None = None
        self._first_ns: int | None = None

    def submitted(self) -> None:
        """The request is checked and handed to the engine."""
        now = time.monotonic_ns()
        self._input_ns = now - self._t0
        self._submitted_ns = now

    def output(self) -> None:
        """The engine gave an output (the first one starts the compute phase)."""
        if self._first_ns is None:
            self._first_ns = time.monotonic_ns()

    @contextmanager
    def building(self) -> Iterator[None]:
        """Times the building of a response."""
        start = time.monotonic_ns()
        try:
            yield
        finally:
            self._output_ns += time.monotonic_ns() - start

    def release(self, ok: bool) -> None:
        now = time.monotonic_ns()
        phases = None
        if self._first_ns is not None and self._submitted_ns is not None:
            phases = {"queue": self._first_ns - self._submitted_ns,
                      "compute_input": self._input_ns,
                      "compute_infer": now - self._first_ns,
                      "compute_output": self._output_ns}
        self._stats.record(ok, now - self._t0, phases)
