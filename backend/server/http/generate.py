"""Triton's generate extension: ``POST /v2/models/{m}[/versions/{v}]/generate`` (one JSON
answer) and ``/generate_stream`` (Server-Sent Events, one ``data:`` event per response).

As Triton maps a generate request (``ConvertGenerateRequest``): every top-level key, and every
key of ``parameters``, that names one of the model's inputs becomes that input tensor (a scalar
or a flat list, typed by the model's config); every other key becomes a request parameter, which
the vLLM backend's mapping reads as a sampling parameter. ``id`` is the request id. The request
then runs through the same ``Inference`` as a gRPC one. An answer is one flat object: ``id``,
``model_name``, ``model_version`` and each output by name (a bare value when it holds one
element), keys in lexicographic order. An error before the first response is a JSON error with
its status; one during a stream is a ``data: {"error": ...}`` event.
"""

from __future__ import annotations

import json
from typing import Any

import numpy as np
from aiohttp import web

from pagedserve.protocol import grpc_service_pb2 as pb
from pagedserve.protocol import model_config_pb2 as mc
from pagedserve.repository import ModelVersion
from pagedserve.server.http.context import HttpContext, model_version, trace_headers
from pagedserve.server.http.errors import HttpError, compact
from pagedserve.server.http.kserve_infer import json_tensor, request_parameters
from pagedserve.server.inference import Inference, InferError
from pagedserve.server.streaming import SHUTTING_DOWN
from pagedserve.server.wire import NUMPY_DTYPES, PROTOCOL_DTYPES, deserialize_bytes

SSE_HEADERS = {"Content-Type": "text/event-stream; charset=utf-8", "Cache-Control": "no-cache"}


def _shape(spec: mc.ModelInput, batching: bool, count: int) -> list[int]:
    """The tensor shape Triton gives ``count`` elements of an input: fixed dims as configured,
    the innermost variable one takes what is left, the others 1."""
    dims = ([-1] if batching else []) + list(spec.dims)
    fixed = int(np.prod([d for d in dims if d != -1])) if any(d != -1 for d in dims) else 1
    if fixed == 0 or count % fixed:
        raise HttpError(400, f"The schema can not convert input '{spec.name}' to tensor with "
                             "proper shape")
    left = count // fixed
    variable = [i for i, d in enumerate(dims) if d == -1]
    shape = [d if d != -1 else 1 for d in dims]
    if variable:
        shape[variable[-1]] = left
    elif left != 1:
        raise HttpError(400, f"The schema can not convert input '{spec.name}' to tensor with "
                             "proper shape")
    return shape


def generate_request(body: dict[str, Any], config: mc.ModelConfig, model_name: str,
                     model_version: str) -> pb.ModelInferRequest:
    """The gRPC form of a generate request."""
    inputs = {i.name: i for i in config.input}
    if "parameters" in inputs:
        raise HttpError(400, "Keyword 'parameters' for nested schema also given as input "
                             "tensor name")
    request = pb.ModelInferRequest(model_name=model_name, model_version=model_version)
    parameters: dict[str, Any] = {}

    def add(key: str, value: Any) -> None:
        spec = inputs.get(key)
        if spec is None:
            parameters[key] = value
            return
        if any(t.name == key for t in request.inputs):
            raise HttpError(400, f"[request id: {request.id or '<id_unknown>'}] input '{key}' "
                                 "already exists in request")
        values = value if isinstance(value, list) else [value]
        datatype = PROTOCOL_DTYPES.get(spec.data_type, "INVALID")
        shape = _shape(spec, config.max_batch_size > 0, len(values))
        request.inputs.add(name=key, datatype=datatype, shape=shape)
        request.raw_input_contents.append(json_tensor(key, datatype, shape, values))

    for key, value in body.items():
        if key == "id":
            if not isinstance(value, str):
                raise HttpError(500, "Unable to parse 'id': attempt to access JSON non-string "
                                     "as string")
            request.id = value
        elif key == "parameters":
            if not isinstance(value, dict):
                raise HttpError(500, "Expected JSON object for keyword: 'parameters': attempt "
                                     "to access JSON non-object as object")
            for inner_key, inner in value.items():
                add(inner_key, inner)
        else:
            add(key, value)
    try:
        request_parameters(request, parameters)
    except HttpError as e:
        if "parameters" in body and any(k in body["parameters"] for k in parameters):
            e.message = f"Converting keyword: 'parameters': {e.message}"
        raise
    return request


def answer(response: pb.ModelInferResponse) -> dict[str, Any]:
    """One response as the generate extension's flat object."""
    out: dict[str, Any] = {"model_name": response.model_name,
                           "model_version": response.model_version}
    if response.id:
        out["id"] = response.id
    for key, value in response.parameters.items():
        choice = value.WhichOneof("parameter_choice")
        # triton_final_response marks the end of a gRPC stream; an HTTP stream ends itself.
        if choice and key not in out and not key.startswith("triton_"):
            out[key] = getattr(value, choice)
    for tensor, raw in zip(response.outputs, response.raw_output_contents):
        if tensor.name in out:
            continue
        if tensor.datatype == "BYTES":
            values: list[Any] = [v.decode("utf-8", "replace")
                                 for v in deserialize_bytes(raw, tensor.name)]
        elif tensor.datatype in NUMPY_DTYPES:
            values = np.frombuffer(raw, dtype=NUMPY_DTYPES[tensor.datatype]).tolist()
        else:
            raise HttpError(400, f"sending {tensor.datatype} data via JSON is not supported")
        out[tensor.name] = values[0] if len(values) == 1 else values
    return dict(sorted(out.items()))


class GenerateRoutes:
    """The two generate routes."""

    def __init__(self, context: HttpContext) -> None:
        self.context = context

    async def _start(self, request: web.Request) -> tuple[ModelVersion, Inference, Any]:
        if self.context.state.draining:
            raise HttpError(503, SHUTTING_DOWN)
        encoding = request.headers.get("Content-Encoding", "identity").strip().lower()
        if encoding not in ("", "identity"):
            raise HttpError(400, "Unsupported content-encoding, only 'identity' is supported.")
        name, version = request.match_info["model"], request.match_info.get("version", "")
        model = model_version(self.context, name, version)
        raw = await request.read()
        try:
            body = json.loads(raw) if raw else None
        except (ValueError, RecursionError) as e:
            raise HttpError(500, f"failed to parse the request JSON buffer: {e}") from None
        if not isinstance(body, dict):
            raise HttpError(500, "failed to parse the request JSON buffer: the request must be "
                                 "a JSON object")
        infer = generate_request(body, model.config, name, version)
        inference = Inference(model, infer, trace_headers(request.headers))
        try:
            generate, _ = inference.prepare()
        except InferError as e:
            raise HttpError.from_grpc(e.code, e.message) from None
        return model, inference, generate

    async def generate(self, request: web.Request) -> web.Response:
        _, inference, generate = await self._start(request)
        last = None
        try:
            async for response in inference.responses(generate, False, False):
                last = response
        except InferError as e:
            raise HttpError.from_grpc(e.code, e.message) from None
        if last is None:
            raise HttpError(500, "no response was produced")
        return web.Response(body=compact(answer(last)), content_type="application/json")

    async def generate_stream(self, request: web.Request) -> web.StreamResponse:
        _, inference, generate = await self._start(request)
        responses = inference.responses(generate, True, False)
        try:
            first = await anext(responses)
        except InferError as e:
            raise HttpError.from_grpc(e.code, e.message) from None
        except StopAsyncIteration:
            raise HttpError(500, "no response was produced") from None
        stream = web.StreamResponse(headers=SSE_HEADERS)
        await stream.prepare(request)
        await stream.write(b"data: " + compact(answer(first)) + b"\n\n")
        try:
            async for response in responses:
                await stream.write(b"data: " + compact(answer(response)) + b"\n\n")
        except (InferError, HttpError) as e:
            await stream.write(b"data: " + compact({"error": e.message}) + b"\n\n")
        finally:
            await responses.aclose()
        await stream.write_eof()
        return stream
