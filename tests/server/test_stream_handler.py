"""StreamHandler in-process: a stream ends only after every request's responses are written."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from typing import Any

from backend.protocol import grpc_service_pb2 as pb
from backend.server.state import ServerState
from backend.server.streaming import StreamHandler

RESPONSES_PER_REQUEST = 3


class _InstantRequests(StreamHandler):
    """Requests answer without an engine: the first at once, the others a little later but
    long before the slow writer has caught up with the first one's end."""

    async def _run(self, request: pb.ModelInferRequest) -> None:
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
