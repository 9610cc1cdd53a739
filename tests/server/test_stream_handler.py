"""StreamHandler in-process: a stream ends only after every request's responses are written;
a cut at the end of the grace period still writes what was queued, then errors the rest."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from typing import Any

from pagedserve.protocol import grpc_service_pb2 as pb
from pagedserve.server.state import ServerState
from pagedserve.server.streaming import CUT, GRACE_OVER, StreamHandler, _Request

RESPONSES_PER_REQUEST = 3


class _InstantRequests(StreamHandler):
    """Requests answer without an engine: the first at once, the others a little later but
    long before the slow writer has caught up with the first one's end."""

    async def _run(self, entry: _Request) -> None:
        request = entry.message
        if request.id != "r0":
            await asyncio.sleep(0.002)
        for i in range(RESPONSES_PER_REQUEST):
            response = pb.ModelInferResponse(id=request.id)
            final = i == RESPONSES_PER_REQUEST - 1
            response.parameters["triton_final_response"].bool_param = final
            self.queue.put_nowait(pb.ModelStreamInferResponse(infer_response=response))


def test_slow_writer_still_sends_every_response() -> None:
    async def requests() -> AsyncIterator[pb.ModelInferRequest]:
        for i in range(8):
            yield pb.ModelInferRequest(model_name="m", id=f"r{i}")

    async def main() -> list[pb.ModelStreamInferResponse]:
        handler = _InstantRequests(repository=None, state=ServerState())  # type: ignore[arg-type]
        written = []
        context: Any = None
        async for response in handler.serve(requests(), context):
            written.append(response)
            await asyncio.sleep(0.01)  # a gRPC write waiting for flow control
        return written

    written = asyncio.run(main())
    assert len(written) == 8 * RESPONSES_PER_REQUEST
    finals = [r.infer_response.id for r in written
              if r.infer_response.parameters["triton_final_response"].bool_param]
    assert sorted(finals) == [f"r{i}" for i in range(8)]


def _final(response: pb.ModelStreamInferResponse) -> bool:
    return response.infer_response.parameters["triton_final_response"].bool_param


class _CutRequests(StreamHandler):
    """``done`` finishes only once the cut is on the queue, so its last response and end
    marker wait behind it; ``running`` and ``waiting`` never finish. ``running`` has resolved
    its model version; ``waiting`` has not, so the cut asks the repository."""

    finish: asyncio.Event

    async def _run(self, entry: _Request) -> None:
        request = entry.message
        response = pb.ModelInferResponse(id=request.id, model_version="7")
        response.parameters["triton_final_response"].bool_param = False
        if request.id == "waiting":
            await asyncio.Event().wait()
        if request.id == "running":
            entry.version = "7"
        self._put(entry, pb.ModelStreamInferResponse(infer_response=response))
        if request.id == "done":
            await self.finish.wait()
            final = pb.ModelInferResponse(id=request.id, model_version="7")
            final.parameters["triton_final_response"].bool_param = True
            self._put(entry, pb.ModelStreamInferResponse(infer_response=final))
        else:
            await asyncio.Event().wait()


class _Repository:
    def get(self, name: str, version: str) -> Any:
        class Model:
            pass
        model = Model()
        model.version = 7  # type: ignore[attr-defined]
        return model


def test_cut_writes_what_was_queued_behind_it_then_errors_the_unanswered() -> None:
    async def requests() -> AsyncIterator[pb.ModelInferRequest]:
        for name in ("done", "running", "waiting"):
            yield pb.ModelInferRequest(model_name="m", id=name)
        await asyncio.Event().wait()  # the client keeps the stream open

    async def main() -> tuple[list[pb.ModelStreamInferResponse], bool]:
        handler = _CutRequests(repository=_Repository(), state=ServerState())  # type: ignore[arg-type]
        handler.finish = asyncio.Event()
        written = []
        context: Any = None
        async for response in handler.serve(requests(), context):
            written.append(response)
            if len(written) == 2:  # done and running have their first responses out
                handler.queue.put_nowait(CUT)
                handler.finish.set()
                await asyncio.sleep(0.01)  # done's end is queued behind the cut meanwhile
        return written, handler.state.no_streams.is_set()

    written, closed = asyncio.run(asyncio.wait_for(main(), 120))
    assert closed
    ids = [(r.infer_response.id, _final(r), r.error_message) for r in written]
    assert ids[:2] == [("done", False, ""), ("running", False, "")], ids
    assert ids[2] == ("done", True, ""), ids  # written, not dropped, and no error after it
    assert sorted(ids[3:]) == [("running", True, GRACE_OVER), ("waiting", True, GRACE_OVER)]
    for response in written[3:]:
        assert response.infer_response.model_name == "m"
        assert response.infer_response.model_version == "7"  # resolved, not the request's ""
