"""``grpc.health.v1.Health/Check``: the server, or one model by name.

An empty service name (or the inference service's name) answers SERVING while the server is
live (not while a loaded version's engine has died) and not draining, as Triton does; a
model name answers SERVING while a version of it is ready.
"""

from __future__ import annotations

from typing import Any

from pagedserve.protocol import health_pb2 as hpb
from pagedserve.protocol import health_pb2_grpc as hpb_grpc
from pagedserve.repository import ModelRepository
from pagedserve.server.state import ServerState, server_live

_STATUS = hpb.HealthCheckResponse
SERVICE_NAMES = ("", "inference.GRPCInferenceService")


class HealthService(hpb_grpc.HealthServicer):
    def __init__(self, repository: ModelRepository, state: ServerState) -> None:
        self.repository = repository
        self.state = state

    async def Check(self, request: hpb.HealthCheckRequest, context: Any
                    ) -> hpb.HealthCheckResponse:
        if request.service in SERVICE_NAMES:
            serving = server_live(self.state, self.repository) and not self.state.draining
        elif request.service in self.repository.model_names():
            serving = bool(self.repository.ready_versions(request.service))
        else:
            return _STATUS(status=_STATUS.SERVICE_UNKNOWN)
        return _STATUS(status=_STATUS.SERVING if serving else _STATUS.NOT_SERVING)
