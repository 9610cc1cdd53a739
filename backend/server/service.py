"""``inference.GRPCInferenceService``: every RPC, with Triton's semantics and error wording."""

from __future__ import annotations

import logging
from collections.abc import AsyncIterator
from contextlib import aclosing
from typing import Any, NoReturn

import grpc

from pagedserve.protocol import grpc_service_pb2 as pb
from pagedserve.protocol import grpc_service_pb2_grpc as pb_grpc
from pagedserve.repository import ModelRepository, ModelVersion, RepositoryError
from pagedserve.repository.names import shown
from pagedserve.server.inference import Inference, InferError, trace_headers
from pagedserve.server.state import (
    EXTENSIONS,
    SERVER_NAME,
    SERVER_VERSION,
    ServerState,
    server_live,
)
from pagedserve.server.streaming import SHUTTING_DOWN, StreamHandler
from pagedserve.server.tracing import ServerTracing, TraceConfigError, check_int, check_level
from pagedserve.server.wire import PROTOCOL_DTYPES

log = logging.getLogger(__name__)

_NO_SHM = ("pagedserve does not support shared memory: send tensors in the request "
           "(raw_input_contents)")
_NOT_EXPLICIT = "explicit model load / unload is not allowed if polling is enabled"


def _single(values: list[str]) -> str:
    return values[0] if len(values) == 1 else ",".join(values)


async def _abort(context: grpc.aio.ServicerContext, code: grpc.StatusCode, message: str
                 ) -> NoReturn:
    await context.abort(code, message)
    raise AssertionError("unreachable")  # context.abort raises


class InferenceService(pb_grpc.GRPCInferenceServiceServicer):
    """The KServe v2 / Triton service over a model repository."""

    def __init__(self, repository: ModelRepository, state: ServerState,
                 tracing: ServerTracing) -> None:
        self.repository = repository
        self.state = state
        self.tracing = tracing

    async def _model(self, context: grpc.aio.ServicerContext, name: str, version: str
                     ) -> ModelVersion:
        """The version asked for, or the call aborted with Triton's status; client strings in
        the message are bounded and escaped by the repository."""
        try:
            return self.repository.get(name, version)
        except RepositoryError as e:
            await _abort(context, e.code, e.message)

    # ---- health and metadata ---------------------------------------------------------------

    async def ServerLive(self, request: pb.ServerLiveRequest, context: Any
                         ) -> pb.ServerLiveResponse:
        return pb.ServerLiveResponse(live=server_live(self.state, self.repository))

    async def ServerReady(self, request: pb.ServerReadyRequest, context: Any
                          ) -> pb.ServerReadyResponse:
        ready = (server_live(self.state, self.repository) and not self.state.draining
                 and self.repository.is_ready())
        return pb.ServerReadyResponse(ready=ready)

    async def ModelReady(self, request: pb.ModelReadyRequest, context: Any
                         ) -> pb.ModelReadyResponse:
        try:
            self.repository.get(request.name, request.version)
        except RepositoryError:
            return pb.ModelReadyResponse(ready=False)
        return pb.ModelReadyResponse(ready=True)

    async def ServerMetadata(self, request: pb.ServerMetadataRequest, context: Any
                             ) -> pb.ServerMetadataResponse:
        return pb.ServerMetadataResponse(name=SERVER_NAME, version=SERVER_VERSION,
                                         extensions=EXTENSIONS)

    async def ModelMetadata(self, request: pb.ModelMetadataRequest, context: Any
                            ) -> pb.ModelMetadataResponse:
        model = await self._model(context, request.name, request.version)
        config = model.config
        versions = ([request.version] if request.version not in ("", "-1") else
                    [str(m.version) for m in self.repository.ready_versions(request.name)])
        batch = [-1] if config.max_batch_size > 0 else []
        tensor = pb.ModelMetadataResponse.TensorMetadata
        return pb.ModelMetadataResponse(
            name=config.name, versions=versions, platform=config.platform or config.backend,
            inputs=[tensor(name=i.name, datatype=PROTOCOL_DTYPES.get(i.data_type, "INVALID"),
                           shape=batch + list(i.dims)) for i in config.input],
            outputs=[tensor(name=o.name, datatype=PROTOCOL_DTYPES.get(o.data_type, "INVALID"),
                            shape=batch + list(o.dims)) for o in config.output])

    async def ModelConfig(self, request: pb.ModelConfigRequest, context: Any
                          ) -> pb.ModelConfigResponse:
        model = await self._model(context, request.name, request.version)
        return pb.ModelConfigResponse(config=model.config)

    async def ModelStatistics(self, request: pb.ModelStatisticsRequest, context: Any
                              ) -> pb.ModelStatisticsResponse:
        if request.name:
            # Triton's wording (INVALID_ARGUMENT, unlike the other RPCs' NOT_FOUND).
            if not self.repository.ready_versions(request.name):
                await _abort(context, grpc.StatusCode.INVALID_ARGUMENT,
                             f"requested model '{shown(request.name)}' is not available")
            if request.version:
                try:
                    models = [self.repository.get(request.name, request.version)]
                except RepositoryError as e:
                    if e.code != grpc.StatusCode.NOT_FOUND:
                        await _abort(context, e.code, e.message)
                    await _abort(context, grpc.StatusCode.INVALID_ARGUMENT,
                                 "requested model version is not available for model "
                                 f"'{request.name}'")
            else:
                models = self.repository.ready_versions(request.name)
        else:
            models = self.repository.all_ready()
        response = pb.ModelStatisticsResponse()
        for model in models:
            durations, inferences, executions, last_ms = model.stats.snapshot()
            entry = response.model_stats.add(name=model.name, version=str(model.version),
                                             last_inference=last_ms,
                                             inference_count=inferences,
                                             execution_count=executions)
            for phase, duration in durations.items():
                stat = getattr(entry.inference_stats, phase)
                stat.count = duration.count
                stat.ns = duration.ns
        return response

    # ---- inference -------------------------------------------------------------------------

    async def ModelInfer(self, request: pb.ModelInferRequest, context: Any
                         ) -> pb.ModelInferResponse:
        if self.state.draining:
            await _abort(context, grpc.StatusCode.UNAVAILABLE, SHUTTING_DOWN)
        model = await self._model(context, request.model_name, request.model_version)
        if model.decoupled:
            await _abort(context, grpc.StatusCode.UNIMPLEMENTED,
                         "ModelInfer RPC doesn't support models with decoupled transaction "
                         "policy")
        inference = Inference(model, request, trace_headers(context))
        try:
            generate, _ = inference.prepare()
            last = None
            async for response in inference.responses(generate, False, False):
                last = response
        except InferError as e:
            await _abort(context, e.code, e.message)
        if last is None:
            await _abort(context, grpc.StatusCode.INTERNAL, "no response was produced")
        return last

    async def ModelStreamInfer(self, request_iterator: AsyncIterator[pb.ModelInferRequest],
                               context: Any) -> AsyncIterator[pb.ModelStreamInferResponse]:
        # grpc.aio recognises streaming handlers as async generator functions.
        if self.state.draining:
            await _abort(context, grpc.StatusCode.UNAVAILABLE, SHUTTING_DOWN)
        handler = StreamHandler(self.repository, self.state)
        async with aclosing(handler.serve(request_iterator, context)) as responses:
            async for response in responses:
                yield response

    # ---- repository ------------------------------------------------------------------------

    async def RepositoryIndex(self, request: pb.RepositoryIndexRequest, context: Any
                              ) -> pb.RepositoryIndexResponse:
        if request.repository_name:
            await _abort(context, grpc.StatusCode.UNIMPLEMENTED,
                         "'repository_name' specification is not supported")
        index = pb.RepositoryIndexResponse.ModelIndex
        return pb.RepositoryIndexResponse(models=[
            index(name=n, version=v, state=s, reason=r)
            for n, v, s, r in self.repository.index(request.ready)])

    async def RepositoryModelLoad(self, request: pb.RepositoryModelLoadRequest, context: Any
                                  ) -> pb.RepositoryModelLoadResponse:
        if request.repository_name:
            await _abort(context, grpc.StatusCode.UNIMPLEMENTED,
                         "'repository_name' specification is not supported")
        if self.repository.control_mode != "explicit":
            await _abort(context, grpc.StatusCode.UNAVAILABLE, _NOT_EXPLICIT)
        override = None
        for key, param in request.parameters.items():
            if key == "config":
                if param.WhichOneof("parameter_choice") != "string_param":
                    await _abort(context, grpc.StatusCode.INVALID_ARGUMENT,
                                 "the 'config' parameter must be a string (JSON ModelConfig)")
                override = param.string_param
            elif key.startswith("file:"):
                # Files sent with the load would be written into the repository
                # (CVE-2023-31036's path): refused outright.
                await _abort(context, grpc.StatusCode.UNIMPLEMENTED,
                             f"pagedserve does not support file overrides ('{shown(key)}')")
        try:
            await self.repository.load(request.model_name, override)
        except RepositoryError as e:
            message = e.message if e.message.startswith("failed to load") else \
                f"load failed for model '{shown(request.model_name)}': {e.message}"
            await _abort(context, e.code, message)
        return pb.RepositoryModelLoadResponse()

    async def RepositoryModelUnload(self, request: pb.RepositoryModelUnloadRequest,
                                    context: Any) -> pb.RepositoryModelUnloadResponse:
        if request.repository_name:
            await _abort(context, grpc.StatusCode.UNIMPLEMENTED,
                         "'repository_name' specification is not supported")
        if self.repository.control_mode != "explicit":
            await _abort(context, grpc.StatusCode.UNAVAILABLE, _NOT_EXPLICIT)
        try:
            await self.repository.unload(request.model_name)
        except RepositoryError as e:
            await _abort(context, e.code, e.message)
        return pb.RepositoryModelUnloadResponse()

    # ---- shared memory: not supported; status lists no regions ------------------------------

    async def SystemSharedMemoryStatus(self, request: pb.SystemSharedMemoryStatusRequest,
                                       context: Any) -> pb.SystemSharedMemoryStatusResponse:
        if request.name:
            await _abort(context, grpc.StatusCode.NOT_FOUND,
                         f"Unable to find system shared memory region: '{request.name}'")
        return pb.SystemSharedMemoryStatusResponse()

    async def SystemSharedMemoryRegister(self, request: Any, context: Any) -> NoReturn:
        await _abort(context, grpc.StatusCode.UNIMPLEMENTED, _NO_SHM)

    async def SystemSharedMemoryUnregister(self, request: Any, context: Any
                                           ) -> pb.SystemSharedMemoryUnregisterResponse:
        return pb.SystemSharedMemoryUnregisterResponse()  # nothing is registered

    async def CudaSharedMemoryStatus(self, request: pb.CudaSharedMemoryStatusRequest,
                                     context: Any) -> pb.CudaSharedMemoryStatusResponse:
        if request.name:
            await _abort(context, grpc.StatusCode.NOT_FOUND,
                         f"Unable to find cuda shared memory region: '{request.name}'")
        return pb.CudaSharedMemoryStatusResponse()

    async def CudaSharedMemoryRegister(self, request: Any, context: Any) -> NoReturn:
        await _abort(context, grpc.StatusCode.UNIMPLEMENTED, _NO_SHM)

    async def CudaSharedMemoryUnregister(self, request: Any, context: Any
                                         ) -> pb.CudaSharedMemoryUnregisterResponse:
        return pb.CudaSharedMemoryUnregisterResponse()

    # ---- trace and log settings ------------------------------------------------------------

    async def TraceSetting(self, request: pb.TraceSettingRequest, context: Any
                           ) -> pb.TraceSettingResponse:
        if request.model_name:
            await self._model(context, request.model_name, "")
            settings = self.state.model_trace.setdefault(request.model_name,
                                                         dict(self.state.trace))
        else:
            settings = self.state.trace
        updated = dict(settings)
        for key, value in request.settings.items():
            if key not in settings:
                await _abort(context, grpc.StatusCode.INVALID_ARGUMENT,
                             f"unknown trace setting '{key}'")
            # An empty value clears a model's setting back to the global one.
            updated[key] = list(value.value) if value.value else list(self.state.trace[key])
        try:
            level = check_level(updated["trace_level"])
            rate = check_int("rate", _single(updated["trace_rate"]), minimum=1)
            count = check_int("count", _single(updated["trace_count"]), minimum=-1)
        except TraceConfigError as e:
            await _abort(context, grpc.StatusCode.INVALID_ARGUMENT, str(e))
        settings.update(updated)
        # What the engines read: a model's own settings, or the global ones for every model
        # that has none of its own.
        if request.model_name:
            targets = [self.tracing.settings_for(request.model_name)]
        else:
            targets = [self.tracing.settings, *(
                live for name, live in self.tracing.model_settings.items()
                if name not in self.state.model_trace)]
        for target in targets:
            target.level, target.rate, target.count = level, rate, count
        response = pb.TraceSettingResponse()
        for key, values in settings.items():
            response.settings[key].value.extend(values)
        return response

    async def LogSettings(self, request: pb.LogSettingsRequest, context: Any
                          ) -> pb.LogSettingsResponse:
        log_state = self.state.log
        for key, value in request.settings.items():
            if key not in log_state:
                continue  # Triton ignores unknown keys
            choice = value.WhichOneof("parameter_choice")
            current = log_state[key]
            expected = ("bool_param" if isinstance(current, bool) else
                        "uint32_param" if isinstance(current, int) else "string_param")
            if choice != expected:
                kind = expected.split("_")[0]
                await _abort(context, grpc.StatusCode.INVALID_ARGUMENT,
                             f"expect '{key}' to be {kind}")
            log_state[key] = getattr(value, expected)
        self.state.apply_log_levels()
        response = pb.LogSettingsResponse()
        for key, current in log_state.items():
            if isinstance(current, bool):
                response.settings[key].bool_param = current
            elif isinstance(current, int):
                response.settings[key].uint32_param = current
            else:
                response.settings[key].string_param = current
        return response
