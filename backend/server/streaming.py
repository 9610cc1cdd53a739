"""``ModelStreamInfer``: many requests in flight on one bidirectional stream.

A reader task takes requests off the stream and starts one task per request; every task puts
its responses on the stream's queue, which the handler writes out one at a time (gRPC allows
one write in flight). Decoupled models' responses interleave across requests (clients match
them by ``id``); a non-decoupled model's responses keep request order, as Triton's do. A failed
request answers with ``error_message`` and the stream stays open. When the stream ends (the
client cancels or disconnects), every request still running on it is cancelled, which aborts
it in the engine and returns its KV blocks. When the server's grace period ends, the responses
already queued are written, then each request whose last response was not among them is
cancelled and answered with a final error response.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import AsyncGenerator, AsyncIterator
from dataclasses import dataclass

import grpc

from pagedserve.protocol import grpc_service_pb2 as pb
from pagedserve.repository import ModelRepository, RepositoryError
from pagedserve.server.inference import Inference, InferError, trace_headers
from pagedserve.server.state import ServerState
from pagedserve.server.wire import MAX_REQUEST_ID_CHARS

log = logging.getLogger(__name__)

_READER_DONE = object()
_TASK_DONE = object()
DRAIN = object()  # put on a stream's queue when the server starts draining
CUT = object()  # put on a stream's queue when the grace period is over
SHUTTING_DOWN = "Server is shutting down: not accepting new requests"
GRACE_OVER = "Server is shutting down: the grace period ended before the request finished"


def _error(request: pb.ModelInferRequest, message: str, version: str = "",
           started: bool = False) -> pb.ModelStreamInferResponse:
    """Triton's error shapes: id only before the request ran; id, model and final after."""
    response = pb.ModelStreamInferResponse(error_message=message)
    if len(request.id) <= MAX_REQUEST_ID_CHARS:  # a refused id is not echoed back
        response.infer_response.id = request.id
    if started:
        response.infer_response.model_name = request.model_name
        response.infer_response.model_version = version
        response.infer_response.parameters["triton_final_response"].bool_param = True
    return response


@dataclass
class _Request:
    """One request of the stream, while its task runs."""

    message: pb.ModelInferRequest
    version: str = ""  # the model version it resolved to, once it has
    answered: bool = False  # its last response is on the queue: a cut leaves it alone


class StreamHandler:
    """Serves one ``ModelStreamInfer`` call."""

    def __init__(self, repository: ModelRepository, state: ServerState) -> None:
        self.repository = repository
        self.state = state
        self.queue: asyncio.Queue[object] = asyncio.Queue()
        self.tasks: dict[asyncio.Task[None], _Request] = {}
        # Requests whose end marker the writer has not consumed yet. The task set empties as
        # tasks finish, possibly while their last responses still wait in the queue behind an
        # earlier marker, so only this count may decide that the stream is done.
        self.unfinished = 0
        self._ordered_tail: asyncio.Future[None] | None = None
        self.trace_headers: dict[str, str] | None = None  # the stream's, for every request

    def _put(self, entry: _Request, response: pb.ModelStreamInferResponse,
             last: bool = False) -> None:
        """Queues one of the request's responses; its ``last`` or a final one answers it."""
        self.queue.put_nowait(response)
        parameters = response.infer_response.parameters
        if last or ("triton_final_response" in parameters
                    and parameters["triton_final_response"].bool_param):
            entry.answered = True

    async def _run(self, entry: _Request) -> None:
        request = entry.message
        previous: asyncio.Future[None] | None = None
        mine: asyncio.Future[None] | None = None
        try:
            model = self.repository.get(request.model_name, request.model_version)
            entry.version = str(model.version)
            if not model.decoupled:
                previous, mine = self._ordered_tail, asyncio.get_running_loop().create_future()
                self._ordered_tail = mine
            inference = Inference(model, request, self.trace_headers)
            generate, empty_final = inference.prepare()
            async for response in inference.responses(generate, True, empty_final):
                if previous is not None:
                    await previous
                    previous = None
                self._put(entry, pb.ModelStreamInferResponse(infer_response=response))
            entry.answered = True
        except RepositoryError as e:
            self._put(entry, _error(request, e.message), last=True)
        except InferError as e:
            if previous is not None:
                await previous
            self._put(entry, _error(request, e.message, entry.version, e.started), last=True)
        except asyncio.CancelledError:
            raise
        except Exception as e:  # a bug must fail the request, never the stream
            log.exception("request %r failed", request.id)
            self._put(entry, _error(request, f"internal error: {e}", entry.version, True),
                      last=True)
        finally:
            if mine is not None and not mine.done():
                mine.set_result(None)

    def _version(self, entry: _Request) -> str:
        """The model version the request resolved to, or would have: its error names it."""
        if entry.version:
            return entry.version
        try:
            return str(self.repository.get(entry.message.model_name,
                                           entry.message.model_version).version)
        except RepositoryError:
            return entry.message.model_version

    def _start(self, request: pb.ModelInferRequest) -> None:
        if self.state.draining:
            self.queue.put_nowait(_error(request, SHUTTING_DOWN))
            return
        entry = _Request(request)
        task = asyncio.create_task(self._run(entry))
        self.tasks[task] = entry
        self.unfinished += 1

        def done(t: asyncio.Task[None]) -> None:
            self.tasks.pop(t, None)
            self.queue.put_nowait(_TASK_DONE)
        task.add_done_callback(done)

    async def _read(self, requests: AsyncIterator[pb.ModelInferRequest]) -> None:
        try:
            async for request in requests:
                self._start(request)
        finally:
            self.queue.put_nowait(_READER_DONE)

    async def serve(self, requests: AsyncIterator[pb.ModelInferRequest],
                    context: grpc.aio.ServicerContext
                    ) -> AsyncGenerator[pb.ModelStreamInferResponse, None]:
        """Yields the stream's responses until the client is done and every request answered."""
        self.state.open_stream(self.queue)
        self.trace_headers = trace_headers(context)
        reader = asyncio.create_task(self._read(requests))
        reader_done = False
        try:
            while True:
                item = await self.queue.get()
                if isinstance(item, pb.ModelStreamInferResponse):
                    yield item
                    continue
                if item is _READER_DONE:
                    reader_done = True
                elif item is _TASK_DONE:
                    self.unfinished -= 1
                elif item is CUT:
                    # Cancelled before anything else runs, the unanswered requests queue
                    # nothing more, so the queue drains to its end: what is on it is written
                    # (the last responses of requests that just finished among it), then the
                    # requests that never got their last response are answered with the error.
                    # The server stops the stream if this outlasts its CUT_WRITE_SECONDS.
                    reader.cancel()
                    cut = [entry for entry in self.tasks.values() if not entry.answered]
                    for task, entry in self.tasks.items():
                        if not entry.answered:
                            task.cancel()
                    while not self.queue.empty():
                        item = self.queue.get_nowait()
                        if isinstance(item, pb.ModelStreamInferResponse):
                            yield item
                    for entry in cut:
                        yield _error(entry.message, GRACE_OVER, self._version(entry), True)
                    return
                if (reader_done or self.state.draining) and not self.unfinished:
                    return
        finally:
            self.state.close_stream(self.queue)
            reader.cancel()
            for task, entry in self.tasks.items():
                if not entry.answered:  # an answered one only has its own end left to run
                    task.cancel()
            if self.tasks:  # let the aborts reach the engine before the handler is gone
                await asyncio.gather(*self.tasks, return_exceptions=True)
