"""asyncio front of the engine: ``generate`` yields outputs as they come, ``abort`` ends a request.

Two threads serve the callers. The input thread validates and tokenizes new requests with an
input processor of its own (fast tokenizers are not safe to share across threads), so a long
prompt never stalls the steps of requests already running; the core thread owns the engine
core and steps it. Commands travel input thread → core thread in the order callers sent them,
so an abort never overtakes the request it ends. Callers on the event loop never touch either:
they receive outputs, or the error that ended their request, through a per-request asyncio
queue fed with ``call_soon_threadsafe``. A caller that stops iterating (a cancelled task, a
closed stream) aborts its request, so its KV blocks return at once. ``in_flight`` counts the
requests that have not ended yet, so that an unload can let them finish before ``shutdown``.
"""

from __future__ import annotations

import asyncio
import contextlib
import copy
import logging
import queue
import sys
import threading
import time
import uuid
from collections.abc import AsyncIterator, Mapping
from dataclasses import dataclass

from pagedserve.engine.core import EngineCore
from pagedserve.engine.input_processor import AdmissionLimits, InputProcessor
from pagedserve.engine.sequence import Request
from pagedserve.engine.structured_output import CompiledConstraint
from pagedserve.lora_request import LoRARequest
from pagedserve.model.executor import ExecutorDied
from pagedserve.outputs import RequestOutput
from pagedserve.sampling_params import SamplingParams

log = logging.getLogger(__name__)

# The core thread runs Python between its torch ops. With CPython's default 5 ms switch interval,
# every output the event loop handles while a step runs would wait up to 5 ms for the GIL (11 ms
# of time to first token through the gRPC server); 0.5 ms bounds that wait.
GIL_SWITCH_INTERVAL_S = 0.0005
# How often an idle core thread looks at its tensor-parallel workers: one that died while no
# request ran is stopped with the others, and the engine reports itself dead.
IDLE_CHECK_S = 1.0


@dataclass
class _Add:
    request_id: str
    prompt: str | None
    params: SamplingParams | None
    prompt_token_ids: list[int] | None
    sink: asyncio.Queue[RequestOutput | BaseException]
    loop: asyncio.AbstractEventLoop
    arrival_ns: int
    trace_headers: Mapping[str, str] | None
    lora_request: LoRARequest | None = None
    constraint: CompiledConstraint | None = None


@dataclass
class _Admit:
    request: Request
    sink: asyncio.Queue[RequestOutput | BaseException]
    loop: asyncio.AbstractEventLoop


@dataclass
class _Abort:
    request_id: str


class EngineOverloaded(Exception):
    """The engine has ``max_num_seqs + max_queue_size`` requests in flight already."""


class RequestFailed(RuntimeError):
    """The request's own step work failed; it ended there and the others went on."""


class EngineDead(RuntimeError):
    """The engine can run no more steps (a tensor-parallel worker died): every request fails."""


class EngineStopped(RuntimeError):
    """The engine was shut down (its model unloaded) before the request ended; the message is
    the reason ``shutdown`` was given."""


class _Stop:
    pass


STOPPED = "engine shut down"  # the reason of a plain ``shutdown()``


class AsyncEngine:
    """Serves many concurrent ``generate`` calls from one engine core thread."""

    def __init__(self, core: EngineCore) -> None:
        if sys.getswitchinterval() > GIL_SWITCH_INTERVAL_S:
            sys.setswitchinterval(GIL_SWITCH_INTERVAL_S)
        self.core = core
        self.limits: AdmissionLimits = core.limits
        self.max_in_flight = core.config.max_num_seqs + core.config.max_queue_size
        self._inputs = InputProcessor(copy.deepcopy(core.tokenizer), core.limits)
        self._incoming: queue.Queue[_Add | _Abort | _Stop] = queue.Queue()
        self._commands: queue.Queue[_Admit | _Abort | _Stop] = queue.Queue()
        self._sinks: dict[str, tuple[asyncio.Queue, asyncio.AbstractEventLoop]] = {}
        self._active: set[str] = set()  # ids in flight, as seen from the callers' side
        self._failure: str | None = None  # set once by the core thread when a step cannot run
        self._stopped: str | None = None  # the reason given to shutdown, once it is called
        self._lock = threading.Lock()
        self._input_thread = threading.Thread(target=self._input_loop, name="engine-input",
                                              daemon=True)
        self._thread = threading.Thread(target=self._loop, name="engine-core", daemon=True)
        self._input_thread.start()
        self._thread.start()

    async def generate(self, prompt: str | None, params: SamplingParams | None = None,
                       request_id: str | None = None,
                       prompt_token_ids: list[int] | None = None,
                       trace_headers: Mapping[str, str] | None = None,
                       lora_request: LoRARequest | None = None
                       ) -> AsyncIterator[RequestOutput]:
        """Yields the request's output after every step that advances it, the last one finished.

        Raises ``ValueError`` (naming the field) before yielding anything if the request is bad,
        ``EngineOverloaded`` if too many requests are in flight, ``RequestFailed`` if the
        request's own step work fails later, and ``EngineStopped`` (with the reason given to
        ``shutdown``) if the engine is shut down before the request ends. Cancelling the
        consuming task aborts the request at once; a caller that stops iterating early should
        close the iterator (``contextlib.aclosing``), since Python finalizes an abandoned async
        generator only when it is garbage-collected. ``trace_headers`` (W3C ``traceparent``,
        ``tracestate``) parent the request's trace span. ``lora_request`` names the adapter it
        runs with (read and checked before it is queued, off the step thread: a bad adapter is
        a ``ValueError`` too). A ``structured_outputs`` constraint is compiled before the
        request is queued, on the compiler's threads: a bad or unsatisfiable one is a
        ``ValueError``, and a slow one delays no other request.
        """
        request_id = request_id or uuid.uuid4().hex
        failure = self.failure()
        if failure is not None:
            raise EngineDead(failure)
        constraint = None
        if params is not None and params.structured_outputs is not None:
            with self._lock:
                if self._stopped is not None:
                    raise EngineStopped(self._stopped)
            compiling = self.core.structured.submit(params.structured_outputs)
            try:
                constraint = await asyncio.wrap_future(compiling)
            except asyncio.CancelledError:
                # A shutdown cancels the compiles still queued: the engine's end, not the
                # caller's cancellation.
                if compiling.cancelled() and self._stopped is not None:
                    raise EngineStopped(self._stopped) from None
                raise
        loop = asyncio.get_running_loop()
        sink: asyncio.Queue[RequestOutput | BaseException] = asyncio.Queue()
        with self._lock:
            if self._stopped is not None:
                raise EngineStopped(self._stopped)
            if request_id in self._active:
                raise ValueError(f"request id {request_id!r} is already in use")
            if len(self._active) >= self.max_in_flight:
                raise EngineOverloaded(
                    f"{len(self._active)} requests are in flight, the most this model takes "
                    f"(max_num_seqs + max_queue_size = {self.max_in_flight}); retry later")
            self._active.add(request_id)
            # Under the lock: queued before a concurrent shutdown's stop, so it is answered.
            self._incoming.put(_Add(request_id, prompt, params, prompt_token_ids, sink, loop,
                                    time.time_ns(), trace_headers, lora_request, constraint))
        finished = False
        try:
            while True:
                item = await sink.get()
                if isinstance(item, BaseException):
                    raise item
                finished = item.finished
                yield item
                if finished:
                    return
        finally:
            if not finished:
                self._incoming.put(_Abort(request_id))
            with self._lock:
                self._active.discard(request_id)

    def failure(self) -> str | None:
        """Why this engine serves no more (a worker process died), or ``None`` while it can."""
        return self._failure or self.core.failure()

    @property
    def in_flight(self) -> int:
        """Requests that have begun (``generate`` called) and not yet ended."""
        with self._lock:
            return len(self._active)

    def abort(self, request_id: str) -> None:
        """Ends a request; its iterator yields a final output with finish reason ``abort``."""
        self._incoming.put(_Abort(request_id))

    def shutdown(self, reason: str = STOPPED) -> None:
        """Stops both threads; requests still running end with ``EngineStopped(reason)``, and
        so does any ``generate`` called later."""
        with self._lock:
            if self._stopped is None:
                self._stopped = reason
                self._incoming.put(_Stop())
        self._input_thread.join()
        self._thread.join()

    # ---- the input thread ------------------------------------------------------------------

    def _input_loop(self) -> None:
        while True:
            command = self._incoming.get()
            if isinstance(command, _Add):
                try:
                    request = self._inputs.make_request(
                        command.request_id, command.prompt, command.params,
                        command.prompt_token_ids, command.arrival_ns, command.trace_headers,
                        command.lora_request, command.constraint)
                    if request.lora_request is not None:
                        # Here, not on the step thread: the steps find the adapter loaded.
                        self.core.load_lora(request.lora_request)
                except ValueError as e:
                    _post(command.loop, command.sink, e)
                    continue
                except Exception as e:  # a tokenizer bug must fail one request, not the thread
                    log.exception("request %s failed at admission", command.request_id)
                    _post(command.loop, command.sink, RequestFailed(f"admission failed: {e}"))
                    continue
                self._commands.put(_Admit(request, command.sink, command.loop))
            else:
                self._commands.put(command)
                if isinstance(command, _Stop):
                    return

    # ---- the core thread -------------------------------------------------------------------

    def _deliver(self, request_id: str, item: RequestOutput | BaseException) -> None:
        sink, loop = self._sinks[request_id]
        if isinstance(item, BaseException) or item.finished:
            del self._sinks[request_id]
        try:
            loop.call_soon_threadsafe(sink.put_nowait, item)
        except RuntimeError:  # the caller's event loop is closed: nobody is listening
            self._sinks.pop(request_id, None)
            self.core.abort(request_id)

    def _apply(self, command: _Admit | _Abort | _Stop) -> bool:
        if isinstance(command, _Stop):
            return False
        if isinstance(command, _Admit):
            request_id = command.request.request_id
            self._sinks[request_id] = (command.sink, command.loop)
            try:
                self.core.add_request(command.request)
            except ValueError as e:
                self._deliver(request_id, e)
        elif command.request_id in self._sinks:
            output = self.core.abort(command.request_id)
            if output is not None:
                self._deliver(command.request_id, output)
        return True

    def _check_executor(self) -> None:
        try:
            self.core.check_executor()
        except ExecutorDied as e:
            if self._failure is None:
                self._failure = str(e)
                log.error("engine is dead: %s", e)

    def _loop(self) -> None:
        self.core.make_device_current()
        running = True
        while running:
            try:
                # Block only when there is nothing to do; otherwise drain and go on stepping.
                block = not self.core.has_unfinished_requests
                while True:
                    command = self._commands.get(block=block, timeout=IDLE_CHECK_S)
                    block = False
                    if not self._apply(command):
                        running = False
                        break
            except queue.Empty:
                if block:  # idle: nothing to step, but a worker that died must be seen
                    self._check_executor()
                    continue
            if not running:
                break
            try:
                outputs = self.core.step()
            except ExecutorDied as e:  # for good: this and every later request fail with it
                self._failure = str(e)
                log.error("engine is dead: %s", e)
                for request_id in list(self._sinks):
                    self.core.abort(request_id)
                    self._deliver(request_id, EngineDead(f"engine step failed: {e}"))
                continue
            except Exception as e:  # a failed step must not strand the callers
                log.exception("engine step failed")
                for request_id in list(self._sinks):
                    self.core.abort(request_id)
                    self._deliver(request_id, RuntimeError(f"engine step failed: {e}"))
                continue
            for output in outputs:
                if output.request_id in self._sinks:
                    self._deliver(output.request_id, output if output.error is None
                                  else RequestFailed(output.error))
        for request_id in list(self._sinks):
            self.core.abort(request_id)
            self._deliver(request_id, EngineStopped(self._stopped or STOPPED))
        self.core.shutdown()


def _post(loop: asyncio.AbstractEventLoop, sink: asyncio.Queue[RequestOutput | BaseException],
          item: RequestOutput | BaseException) -> None:
    """Hands ``item`` to a caller's queue from another thread; a closed loop has no listener."""
    with contextlib.suppress(RuntimeError):
        loop.call_soon_threadsafe(sink.put_nowait, item)
