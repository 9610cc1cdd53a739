"""KServe v2 REST as Triton serves it: health, metadata, config, statistics, repository, trace,
logging and shared memory (none), each a call of the gRPC service's own RPC method with the
answer turned into Triton's JSON. Inference (``/infer``) is ``kserve_infer``'s.

JSON shapes follow Triton 2.51's HTTP server: compact JSON; model config as protobuf JSON with
proto field names, every field printed, enums by name and the int64 fields Triton lists turned
back into numbers; statistics with every counter a number; the repository index a bare array.
"""

from __future__ import annotations

import json
from collections.abc import Callable, Iterable
from typing import Any

from aiohttp import web
from google.protobuf import json_format
from google.protobuf.descriptor import FieldDescriptor
from google.protobuf.message import Message

from pagedserve.protocol import grpc_service_pb2 as pb
from pagedserve.server.http.context import HttpContext, ServiceCall
from pagedserve.server.http.errors import HttpError, json_response

# Model-config fields Triton prints as JSON numbers although proto3 JSON makes int64 strings
# ("*": any list index or map key).
_CONFIG_NUMBERS = {
    ("input", "*", "dims"), ("input", "*", "reshape", "shape"),
    ("output", "*", "dims"), ("output", "*", "reshape", "shape"),
    ("version_policy", "specific", "versions"),
    ("dynamic_batching", "max_queue_delay_microseconds"),
    ("dynamic_batching", "priority_levels"), ("dynamic_batching", "default_priority_level"),
    ("dynamic_batching", "default_queue_policy", "default_timeout_microseconds"),
    ("dynamic_batching", "priority_queue_policy", "*", "default_timeout_microseconds"),
    ("sequence_batching", "max_sequence_idle_microseconds"),
    ("sequence_batching", "oldest", "max_queue_delay_microseconds"),
    ("sequence_batching", "direct", "max_queue_delay_microseconds"),
    ("sequence_batching", "state", "*", "dims"),
    ("ensemble_scheduling", "step", "*", "model_version"),
    ("model_warmup", "*", "inputs", "*", "dims"),
}
_INT64_TYPES = {FieldDescriptor.TYPE_INT64, FieldDescriptor.TYPE_UINT64,
                FieldDescriptor.TYPE_SINT64, FieldDescriptor.TYPE_FIXED64,
                FieldDescriptor.TYPE_SFIXED64}


def _numbers_at(value: Any, paths: set[tuple[str, ...]], path: tuple[str, ...] = ()) -> Any:
    """``value`` with the strings at ``paths`` (and the lists there) turned into ints."""
    if any(len(p) == len(path) and all(a in ("*", b) for a, b in zip(p, path)) for p in paths):
        return [int(v) for v in value] if isinstance(value, list) else int(value)
    if isinstance(value, dict):
        return {k: _numbers_at(v, paths, (*path, k)) for k, v in value.items()}
    if isinstance(value, list):
        return [_numbers_at(v, paths, (*path, "*")) for v in value]
    return value


def _message_dict(message: Message) -> dict[str, Any]:
    return json_format.MessageToDict(message, preserving_proto_field_name=True,
                                     always_print_fields_with_no_presence=True)


def _all_numbers(message: Message) -> dict[str, Any]:
    """Protobuf JSON of ``message`` with every 64-bit integer a JSON number."""
    out: dict[str, Any] = {}
    for field in message.DESCRIPTOR.fields:
        value = getattr(message, field.name)
        if field.message_type is not None and field.message_type.GetOptions().map_entry:
            entry = field.message_type.fields_by_name["value"]
            out[field.name] = {str(k): _all_numbers(v) if entry.message_type else v
                               for k, v in value.items()}
        elif field.is_repeated:
            out[field.name] = [_all_numbers(v) if field.message_type else v for v in value]
        elif field.message_type is not None:
            out[field.name] = _all_numbers(value)
        else:
            out[field.name] = int(value) if field.type in _INT64_TYPES else value
    return out


def _json_body(body: bytes, default: Any) -> Any:
    """A request's JSON body (``default`` when empty), refused as Triton refuses bad JSON."""
    if not body:
        return default
    try:
        return json.loads(body)
    except (ValueError, RecursionError) as e:
        raise HttpError(500, f"failed to parse the request JSON buffer: {e}") from None


def _object(value: Any, what: str) -> dict[str, Any]:
    if not isinstance(value, dict):
        raise HttpError(500, f"Unable to parse '{what}': attempt to access JSON non-object as "
                             "object")
    return value


class KServeRoutes:
    """The handlers; ``routes()`` lists them with their Triton API group."""

    def __init__(self, context: HttpContext) -> None:
        self.context = context
        self.service = context.service

    def routes(self) -> Iterable[tuple[str, str, Callable[..., Any], str]]:
        """(method, path, handler, restricted-API group) of every route but ``/infer``."""
        model = "/v2/models/{model}"
        versioned = "/v2/models/{model}/versions/{version:[0-9]+}"
        yield "GET", "/v2/health/live", self.live, "health"
        yield "GET", "/v2/health/ready", self.ready, "health"
        yield "GET", "/v2", self.server_metadata, "metadata"
        # Before the model routes, as Triton matches it: a model named "stats" is unreachable.
        yield "GET", "/v2/models/stats", self.statistics, "statistics"
        for base in (model, versioned):
            yield "GET", base, self.model_metadata, "metadata"
            yield "GET", base + "/ready", self.model_ready, "health"
            yield "GET", base + "/config", self.model_config, "model-config"
            yield "GET", base + "/stats", self.statistics, "statistics"
        for method in ("GET", "POST"):
            yield method, model + "/trace/setting", self.trace_setting, "trace"
            yield method, "/v2/trace/setting", self.trace_setting, "trace"
            yield method, "/v2/logging", self.logging, "logging"
        for repo in ("/v2/repository", "/v2/repository/{repository}"):
            yield "POST", repo + "/index", self.repository_index, "model-repository"
            yield "POST", repo + "/models/{model}/load", self.load, "model-repository"
            yield "POST", repo + "/models/{model}/unload", self.unload, "model-repository"
        for kind in ("systemsharedmemory", "cudasharedmemory"):
            for region in ("", "/region/{region}"):
                yield "GET", f"/v2/{kind}{region}/status", self.shm_status, "shared-memory"
                yield "POST", f"/v2/{kind}{region}/register", self.shm_register, "shared-memory"
                yield ("POST", f"/v2/{kind}{region}/unregister", self.shm_unregister,
                       "shared-memory")

    # ---- health ----------------------------------------------------------------------------

    async def live(self, request: web.Request) -> web.Response:
        response = await self.service.ServerLive(pb.ServerLiveRequest(), ServiceCall())
        return web.Response(status=200 if response.live else 400)

    async def ready(self, request: web.Request) -> web.Response:
        response = await self.service.ServerReady(pb.ServerReadyRequest(), ServiceCall())
        return web.Response(status=200 if response.ready else 400)

    async def model_ready(self, request: web.Request) -> web.Response:
        response = await self.service.ModelReady(pb.ModelReadyRequest(
            name=request.match_info["model"], version=request.match_info.get("version", "")),
            ServiceCall())
        if not response.ready:
            raise HttpError(400, "Model version not ready")
        return web.Response(status=200)

    # ---- metadata, config, statistics -------------------------------------------------------

    async def server_metadata(self, request: web.Request) -> web.Response:
        response = await self.service.ServerMetadata(pb.ServerMetadataRequest(), ServiceCall())
        return json_response({"name": response.name, "version": response.version,
                              "extensions": list(response.extensions)})

    async def model_metadata(self, request: web.Request) -> web.Response:
        response = await self.service.ModelMetadata(pb.ModelMetadataRequest(
            name=request.match_info["model"], version=request.match_info.get("version", "")),
            ServiceCall())

        def tensors(items: Iterable[Any]) -> list[dict[str, Any]]:
            return [{"name": t.name, "datatype": t.datatype, "shape": list(t.shape)}
                    for t in items]

        return json_response({"name": response.name, "versions": list(response.versions),
                              "platform": response.platform,
                              "inputs": tensors(response.inputs),
                              "outputs": tensors(response.outputs)})

    async def model_config(self, request: web.Request) -> web.Response:
        response = await self.service.ModelConfig(pb.ModelConfigRequest(
            name=request.match_info["model"], version=request.match_info.get("version", "")),
            ServiceCall())
        return json_response(_numbers_at(_message_dict(response.config), _CONFIG_NUMBERS))

    async def statistics(self, request: web.Request) -> web.Response:
        response = await self.service.ModelStatistics(pb.ModelStatisticsRequest(
            name=request.match_info.get("model", ""),
            version=request.match_info.get("version", "")), ServiceCall())
        return json_response(_all_numbers(response))

    # ---- repository ------------------------------------------------------------------------

    async def repository_index(self, request: web.Request) -> web.Response:
        body = _object(_json_body(await request.read(), {}), "body")
        ready = body.get("ready", False)
        if not isinstance(ready, bool):
            raise HttpError(500, "attempt to access JSON non-boolean as boolean")
        response = await self.service.RepositoryIndex(pb.RepositoryIndexRequest(
            repository_name=request.match_info.get("repository", ""), ready=ready),
            ServiceCall())
        entries = []
        for m in response.models:
            entry = {"name": m.name}
            entry.update({k: v for k, v in (("version", m.version), ("state", m.state),
                                            ("reason", m.reason)) if v})
            entries.append(entry)
        return json_response(entries)

    async def load(self, request: web.Request) -> web.Response:
        body = _object(_json_body(await request.read(), {}), "body")
        load = pb.RepositoryModelLoadRequest(
            repository_name=request.match_info.get("repository", ""),
            model_name=request.match_info["model"])
        for key, value in _object(body.get("parameters", {}), "parameters").items():
            if not isinstance(value, str):
                raise HttpError(500, "attempt to access JSON non-string as string")
            load.parameters[key].string_param = value
        await self.service.RepositoryModelLoad(load, ServiceCall())
        return web.Response(status=200, content_type="application/json")

    async def unload(self, request: web.Request) -> web.Response:
        await self.service.RepositoryModelUnload(pb.RepositoryModelUnloadRequest(
            repository_name=request.match_info.get("repository", ""),
            model_name=request.match_info["model"]), ServiceCall())
        return web.Response(status=200, content_type="application/json")

    # ---- trace and logging -----------------------------------------------------------------

    async def trace_setting(self, request: web.Request) -> web.Response:
        setting = pb.TraceSettingRequest(model_name=request.match_info.get("model", ""))
        if request.method == "POST":
            body = _object(_json_body(await request.read(), None), "body")
            for key, value in body.items():
                if key == "trace_file":
                    raise HttpError(501, "trace file location can not be updated through "
                                         "network protocol")
                values = [] if value is None else value if key == "trace_level" else [value]
                if not isinstance(values, list) or not all(isinstance(v, str) for v in values):
                    raise HttpError(500, f"Unable to parse '{key}': attempt to access JSON "
                                         "non-string as string")
                setting.settings[key].value.extend(values)
        response = await self.service.TraceSetting(setting, ServiceCall())
        return json_response({key: list(v.value) if key == "trace_level"
                              else ",".join(v.value)
                              for key, v in response.settings.items()})

    async def logging(self, request: web.Request) -> web.Response:
        settings = pb.LogSettingsRequest()
        if request.method == "POST":
            body = _object(_json_body(await request.read(), None), "body")
            for key, value in body.items():
                if value is None:
                    continue
                if key == "log_file":
                    raise HttpError(501, "log file location can not be updated through "
                                         "network protocol")
                param = settings.settings[key]
                if isinstance(value, bool):
                    param.bool_param = value
                elif isinstance(value, int) and value >= 0:
                    param.uint32_param = value
                elif isinstance(value, str):
                    param.string_param = value
                else:
                    raise HttpError(500, f"attempt to access JSON value of '{key}' as "
                                         "boolean, unsigned integer or string")
        response = await self.service.LogSettings(settings, ServiceCall())
        return json_response({key: getattr(v, v.WhichOneof("parameter_choice"))
                              for key, v in response.settings.items()})

    # ---- shared memory: not supported; none is registered ----------------------------------

    async def shm_status(self, request: web.Request) -> web.Response:
        region = request.match_info.get("region", "")
        if "cuda" in request.path.split("/")[2]:
            await self.service.CudaSharedMemoryStatus(
                pb.CudaSharedMemoryStatusRequest(name=region), ServiceCall())
        else:
            await self.service.SystemSharedMemoryStatus(
                pb.SystemSharedMemoryStatusRequest(name=region), ServiceCall())
        return json_response([])

    async def shm_register(self, request: web.Request) -> web.Response:
        await self.service.SystemSharedMemoryRegister(None, ServiceCall())  # refuses: 501
        raise AssertionError("unreachable")

    async def shm_unregister(self, request: web.Request) -> web.Response:
        return web.Response(status=200, content_type="application/json")
