"""``ModelStreamInfer``: many requests in flight on one bidirectional stream.

A reader task takes requests off the stream and starts one task per request; every task puts
its responses on the stream's queue, which the handler writes out one at a time (gRPC allows
one write in flight). Decoupled models' responses interleave across requests (clients match
them by ``id``); a non-decoupled model's responses keep request order, as Triton's do. A failed
request answers with ``error_message`` and the stream stays open. When the stream ends (the
client cancels or disconnects), every request still running on it is cancelled, which aborts
it in the engine and returns its KV blocks. When the server's grace period ends, each request
still running is cancelled and answered with a final error response.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import AsyncGenerator, AsyncIterator

import grpc

from backend.protocol import grpc_service_pb2 as pb
from backend.repository import ModelRepository, RepositoryError
from backend.server.inference import Inference, InferError, trace_headers
from backend.server.state import ServerState
from backend.server.wire import MAX_REQUEST_ID_CHARS

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


class StreamHandler:
    """Serves one ``ModelStreamInfer`` call."""

    def __init__(self, repository: ModelRepository, state: ServerState) -> None:
        self.repository = repository
        self.state = state
        self.queue: asyncio.Queue[object] = asyncio.Queue()
        self.tasks: dict[asyncio.Task[None], pb.ModelInferRequest] = {}
        # Requests whose end marker the writer has not consumed yet. The task set empties as
        # tasks finish, possibly while their last responses still wait in the queue behind an
        # earlier marker, so only this count may decide that the stream is done.
        self.unfinished = 0
        self._ordered_tail: asyncio.Future[None] | None = None
        self.trace_headers: dict[str, str] | None = None  # the stream's, for every request

    async def _run(self, request: pb.ModelInferRequest) -> None:
        previous: asyncio.Future[None] | None = None
        mine: asyncio.Future[None] | None = None
        version = request.model_version
        try:
            model = self.repository.get(request.model_name, request.model_version)
            version = str(model.version)
            if not model.decoupled:
                previous, mine = self._ordered_tail, asyncio.get_running_loop().create_future()
                self._ordered_tail = mine
            inference = Inference(model, request, self.trace_headers)
            generate, empty_final = inference.prepare()
            async for response in inference.responses(generate, True, empty_final):
                if previous is not None:
                    await previous
                    previous = None
                self.queue.put_nowait(pb.ModelStreamInferResponse(infer_response=response))
        except RepositoryError as e:
            self.queue.put_nowait(_error(request, e.message))
        except InferError as e:
            if previous is not None:
                await previous
            self.queue.put_nowait(_error(request, e.message, version, e.started))
        except asyncio.CancelledError:
            raise
        except Exception as e:  # a bug must fail the request, never the stream
            log.exception("request %r failed", request.id)
            self.queue.put_nowait(_error(request, f"internal error: {e}", version, True))
        finally:
            if mine is not None and not mine.done():
                mine.set_result(None)

    def _start(self, request: pb.ModelInferRequest) -> None:
        if self.state.draining:
            self.queue.put_nowait(_error(request, SHUTTING_DOWN))
            return
        task = asyncio.create_task(self._run(request))
        self.tasks[task] = request
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
                    cut = list(self.tasks.items())
                    for task, _ in cut:
                        task.cancel()
                    for _, request in cut:
                        yield _error(request, GRACE_OVER, request.model_version, True)
                    return
                if (reader_done or self.state.draining) and not self.unfinished:
                    return
        finally:
            self.state.close_stream(self.queue)
            reader.cancel()
            for task in list(self.tasks):
                task.cancel()
            if self.tasks:  # let the aborts reach the engine before the handler is gone
                await asyncio.gather(*self.tasks, return_exceptions=True)
