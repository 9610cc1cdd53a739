"""``POST /v2/models/{m}[/versions/{v}]/infer``: KServe v2 JSON and Triton's binary tensors.

A request becomes the ``ModelInferRequest`` the gRPC service would get (every input as raw
bytes), runs through the same ``Inference``, and its response goes back as JSON, with the
outputs asked for in binary appended after the JSON header (``Inference-Header-Content-Length``).
Parsing follows Triton 2.51's HTTP server, its error wording and codes included: JSON that does
not parse, or whose fields have the wrong JSON type, is its "internal" error (500); everything
else it refuses is 400. Bodies compressed with gzip or deflate are inflated, to at most the
body limit; responses are compressed when the client accepts it.
"""

from __future__ import annotations

import json
import zlib
from dataclasses import dataclass, field
from typing import Any

import numpy as np
from aiohttp import web

from pagedserve.protocol import grpc_service_pb2 as pb
from pagedserve.protocol import model_config_pb2 as mc
from pagedserve.server.http.context import HttpContext, model_version, trace_headers
from pagedserve.server.http.errors import HttpError, compact
from pagedserve.server.inference import Inference, InferError
from pagedserve.server.streaming import SHUTTING_DOWN
from pagedserve.server.wire import NUMPY_DTYPES, deserialize_bytes, serialize_bytes

HEADER_LENGTH = "Inference-Header-Content-Length"
_INT64 = (-(2**63), 2**63 - 1)
_NOT_JSON = {"FP16", "BF16"}


@dataclass
class OutputChoice:
    """How each output goes back: binary or JSON."""

    default_binary: bool = False
    binary: dict[str, bool] = field(default_factory=dict)

    def is_binary(self, name: str) -> bool:
        return self.binary.get(name, self.default_binary)


def _field(value: Any, kind: type | tuple[type, ...], what: str, name: str) -> Any:
    if not isinstance(value, kind) or (kind is int and isinstance(value, bool)):
        raise HttpError(500, f"Unable to parse '{what}': attempt to access JSON non-{name} as "
                             f"{name}")
    return value


def _parameter(request: pb.ModelInferRequest, key: str, value: Any) -> None:
    param = request.parameters[key]
    if isinstance(value, bool):
        param.bool_param = value
    elif isinstance(value, int) and _INT64[0] <= value <= _INT64[1]:
        param.int64_param = value
    elif isinstance(value, int | float):
        param.double_param = float(value)
    elif isinstance(value, str):
        param.string_param = value
    else:
        del request.parameters[key]
        raise HttpError(400, f"parameter '{key}' has invalid type. It should be either 'int', "
                             "'bool', or 'string'.")


def request_parameters(request: pb.ModelInferRequest, values: dict[str, Any]) -> None:
    """Sets JSON request parameters as Triton types them; ``triton_`` keys are Triton's."""
    for key, value in values.items():
        if key.startswith("triton_"):
            raise HttpError(400, "parameter keys starting with 'triton_' are reserved for Triton "
                                 "usage and should not be specified.")
        _parameter(request, key, value)


def _flatten(data: Any) -> list[Any]:
    if not isinstance(data, list):
        return [data]
    flat: list[Any] = []
    for item in data:
        flat.extend(_flatten(item))
    return flat


def json_tensor(name: str, datatype: str, shape: list[int], data: Any) -> bytes:
    """The raw bytes of a tensor given as JSON ``data`` (nested lists are flattened)."""
    if datatype in _NOT_JSON:
        raise HttpError(400, f"receiving {datatype} data via JSON is not supported. Please use "
                             f"the binary data format for input {name}")
    if datatype != "BYTES" and datatype not in NUMPY_DTYPES:
        raise HttpError(400, f"invalid datatype for input {name}")
    count = int(np.prod(shape)) if shape else 0
    if count == 0:
        return b""
    _field(data, list, "data", "array")
    values = _flatten(data)
    # As Triton: BYTES elements are counted later, by the checks against the model's config.
    if len(values) != count and datatype != "BYTES":
        raise HttpError(500, "Unable to parse 'data': Shape does not match true shape of 'data' "
                             "field")
    if datatype == "BYTES":
        if not all(isinstance(v, str) for v in values):
            raise HttpError(500, "Unable to parse JSON bytes array: attempt to access JSON "
                                 "non-string as string")
        return serialize_bytes(np.array([v.encode("utf-8", "surrogateescape") for v in values],
                                        dtype=np.object_))
    if datatype == "BOOL":
        kinds: tuple[type, ...] = (bool,)
        wrong = "boolean"
    elif datatype.startswith(("INT", "UINT")):
        kinds, wrong = (int,), "integer"
        if any(isinstance(v, bool) for v in values):
            values = [None]
    else:
        kinds, wrong = (int, float), "number"
        if any(isinstance(v, bool) for v in values):
            values = [None]
    if not all(isinstance(v, kinds) for v in values):
        raise HttpError(500, f"Unable to parse 'data': attempt to access JSON non-{wrong} as "
                             f"{wrong}")
    try:
        return np.array(values, dtype=NUMPY_DTYPES[datatype]).tobytes()
    except OverflowError:
        raise HttpError(400, f"value out of range of {datatype} in input {name}") from None


def _inflate(body: bytes, encoding: str, limit: int) -> bytes:
    if encoding in ("", "identity"):
        return body
    if encoding not in ("gzip", "deflate"):
        raise HttpError(501, "Unsupported compression type")
    if not body:
        raise HttpError(400, "nothing to be decompressed")
    inflater = zlib.decompressobj(15 | 32)  # zlib or gzip wrapper, as Triton accepts either
    try:
        out = inflater.decompress(body, limit + 1)
    except zlib.error as e:
        raise HttpError(400, f"failed to decompress the request body: {e}") from None
    if len(out) > limit or inflater.unconsumed_tail:
        raise HttpError(413, f"the request body inflates to more than --http-max-input-size "
                             f"({limit} bytes)")
    return out


def parse_infer_request(body: bytes, header_length: int | None, config: mc.ModelConfig,
                        model_name: str, model_version: str
                        ) -> tuple[pb.ModelInferRequest, OutputChoice]:
    """The gRPC form of one HTTP infer request, and how its outputs go back."""
    length = len(body) if header_length is None else header_length
    if not 0 <= length <= len(body):
        raise HttpError(400, f"inference header size should be in range (0, {len(body)}), "
                             f"got: {length}")
    if length == 0:
        raise HttpError(400, f"Raw request must only have 1 input (found 1) to be deduced but "
                             f"got {len(config.input)} inputs in '{config.name}' model "
                             "configuration")
    try:
        header = json.loads(body[:length])
    except (ValueError, RecursionError) as e:
        raise HttpError(500, f"failed to parse the request JSON buffer: {e}") from None
    _field(header, dict, "body", "object")
    request = pb.ModelInferRequest(model_name=model_name, model_version=model_version)
    if "id" in header:
        request.id = _field(header["id"], str, "id", "string")
    choice = OutputChoice()
    if "parameters" in header:
        parameters = dict(_field(header["parameters"], dict, "parameters", "object"))
        if "binary_data_output" in parameters:
            choice.default_binary = bool(_field(parameters.pop("binary_data_output"), bool,
                                                "binary_data_output", "boolean"))
        request_parameters(request, parameters)
    binary = memoryview(body)[length:]
    offset = 0
    for item in _field(header.get("inputs"), list, "inputs", "array"):
        _field(item, dict, "inputs", "object")
        name = _field(item.get("name"), str, "name", "string")
        datatype = _field(item.get("datatype"), str, "datatype", "string")
        shape = [_field(d, int, "shape", "unsigned-integer")
                 for d in _field(item.get("shape"), list, "shape", "array")]
        if any(d < 0 for d in shape):
            raise HttpError(500, "Unable to parse 'shape': attempt to access JSON "
                                 "non-unsigned-integer as unsigned-integer")
        params = _field(item.get("parameters", {}), dict, "parameters", "object")
        given = [f for f, present in (("'data'", "data" in item),
                                      ("'binary_data_size'", "binary_data_size" in params),
                                      ("'shared_memory_region'",
                                       "shared_memory_region" in params)) if present]
        if len(given) != 1:
            detail = "no field is set" if not given else "set " + " ".join(given)
            raise HttpError(400, "Input must set only one of the following fields: 'data', "
                                 "'binary_data_size' in 'parameters', 'shared_memory_region' in "
                                 f"'parameters'. But {detail}")
        if "shared_memory_region" in params:
            raise HttpError(400, "pagedserve does not support shared memory: send tensors in "
                                 "the request")
        if "data" in item:
            raw = json_tensor(name, datatype, shape, item["data"])
        else:
            size = _field(params["binary_data_size"], int, "binary_data_size",
                          "unsigned-integer")
            if size < 0 or offset + size > len(binary):
                raise HttpError(400, f"unexpected size for input '{name}', expecting "
                                     f"{len(binary) - offset} additional bytes for model "
                                     f"'{model_name}'")
            raw = bytes(binary[offset:offset + size])
            offset += size
        # Every input's contents travel in raw_input_contents, aligned with inputs.
        request.inputs.add(name=name, datatype=datatype, shape=shape)
        request.raw_input_contents.append(raw)
    if offset != len(binary):
        raise HttpError(400, f"unexpected additional input data for model '{model_name}'")
    for item in _field(header.get("outputs", []), list, "outputs", "array"):
        _field(item, dict, "outputs", "object")
        name = _field(item.get("name"), str, "name", "string")
        params = _field(item.get("parameters", {}), dict, "parameters", "object")
        if "classification" in params:
            raise HttpError(400, "pagedserve does not support classification outputs")
        if "binary_data" in params:
            choice.binary[name] = _field(params["binary_data"], bool, "binary_data", "boolean")
        request.outputs.add(name=name)
    return request, choice


def _json_data(datatype: str, raw: bytes, name: str) -> list[Any]:
    if datatype in _NOT_JSON:
        raise HttpError(400, f"sending {datatype} data via JSON is not supported. Please use "
                             f"the binary data format for output {name}")
    if datatype == "BYTES":
        return [v.decode("utf-8", "replace") for v in deserialize_bytes(raw, name)]
    values: list[Any] = np.frombuffer(raw, dtype=NUMPY_DTYPES[datatype]).tolist()
    return values


def encode_infer_response(response: pb.ModelInferResponse, choice: OutputChoice,
                          accept_encoding: str) -> web.Response:
    """Triton's JSON answer, with binary outputs after the JSON header."""
    head: dict[str, Any] = {}
    if response.id:
        head["id"] = response.id
    head["model_name"] = response.model_name
    head["model_version"] = response.model_version
    params = {k: getattr(v, v.WhichOneof("parameter_choice"))
              for k, v in response.parameters.items() if v.WhichOneof("parameter_choice")}
    if params:
        head["parameters"] = params
    outputs, buffers = [], []
    for tensor, raw in zip(response.outputs, response.raw_output_contents):
        out: dict[str, Any] = {"name": tensor.name, "datatype": tensor.datatype,
                               "shape": list(tensor.shape)}
        if choice.is_binary(tensor.name):
            out["parameters"] = {"binary_data_size": len(raw)}
            if raw:
                buffers.append(raw)
        else:
            out["data"] = _json_data(tensor.datatype, raw, tensor.name)
        outputs.append(out)
    head["outputs"] = outputs
    header = compact(head)
    headers = {}
    if buffers:
        body = b"".join([header, *buffers])
        headers[HEADER_LENGTH] = str(len(header))
        content_type = "application/octet-stream"
    else:
        body, content_type = header, "application/json"
    encoding = _accepted_encoding(accept_encoding)
    if encoding is not None:
        wbits = 31 if encoding == "gzip" else 15
        packer = zlib.compressobj(wbits=wbits)
        body = packer.compress(body) + packer.flush()
        headers["Content-Encoding"] = encoding
    return web.Response(body=body, headers=headers, content_type=content_type)


def _accepted_encoding(header: str) -> str | None:
    """The compression a client asks for (highest q among gzip and deflate), if any."""
    best, best_q = None, 0.0
    for part in header.split(","):
        name, _, q = part.strip().partition(";q=")
        try:
            weight = float(q) if q else 1.0
        except ValueError:
            continue
        if name in ("gzip", "deflate") and weight > best_q:
            best, best_q = name, weight
    return best


async def read_body(request: web.Request, limit: int) -> bytes:
    """The request's body, inflated if compressed (at most ``limit`` bytes either way)."""
    body = await request.read()
    return _inflate(body, request.headers.get("Content-Encoding", "").strip().lower(), limit)


class InferRoute:
    """``POST .../infer``."""

    def __init__(self, context: HttpContext) -> None:
        self.context = context

    async def infer(self, request: web.Request) -> web.Response:
        if self.context.state.draining:
            raise HttpError(503, SHUTTING_DOWN)
        name, version = request.match_info["model"], request.match_info.get("version", "")
        model = model_version(self.context, name, version)
        if model.decoupled:
            raise HttpError(501, "HTTP end point doesn't support models with decoupled "
                                 "transaction policy")
        body = await read_body(request, self.context.settings.max_body_bytes)
        header = request.headers.get(HEADER_LENGTH)
        try:
            header_length = None if header is None else int(header)
        except ValueError:
            raise HttpError(400, f"invalid {HEADER_LENGTH} header: {str(header)[:40]!r}"
                            ) from None
        infer, choice = parse_infer_request(body, header_length, model.config, name, version)
        inference = Inference(model, infer, trace_headers(request.headers))
        try:
            generate, _ = inference.prepare()
            last = None
            async for response in inference.responses(generate, False, False):
                last = response
        except InferError as e:
            raise HttpError.from_grpc(e.code, e.message) from None
        if last is None:
            raise HttpError(500, "no response was produced")
        return encode_infer_response(last, choice, request.headers.get("Accept-Encoding", ""))
