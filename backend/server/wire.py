"""KServe v2 protobuf messages ↔ numpy arrays, validated against the model's config.

Input checks and their messages follow Triton's (``infer_request.cc``): unexpected inputs, wrong
datatype, wrong shape, missing required inputs, byte-size mismatches; and its gRPC frontend's
(``grpc/infer_handler.cc``): typed ``contents`` beside ``raw_input_contents``. Requested outputs
are checked as its core does: each named once, each one the model has. BYTES elements travel as a
4-byte little-endian length followed by the bytes; responses always carry one
``raw_output_contents`` entry per output, aligned with ``outputs`` (perf_analyzer's C++ client
indexes them unconditionally).
"""

from __future__ import annotations

import struct
from typing import Any

import numpy as np

from pagedserve.protocol import grpc_service_pb2 as pb
from pagedserve.protocol import model_config_pb2 as mc
from pagedserve.repository.names import shown
from pagedserve.tensors import TensorError

# ModelConfig DataType -> protocol datatype string.
PROTOCOL_DTYPES = {
    mc.TYPE_BOOL: "BOOL", mc.TYPE_UINT8: "UINT8", mc.TYPE_UINT16: "UINT16",
    mc.TYPE_UINT32: "UINT32", mc.TYPE_UINT64: "UINT64", mc.TYPE_INT8: "INT8",
    mc.TYPE_INT16: "INT16", mc.TYPE_INT32: "INT32", mc.TYPE_INT64: "INT64",
    mc.TYPE_FP16: "FP16", mc.TYPE_FP32: "FP32", mc.TYPE_FP64: "FP64",
    mc.TYPE_STRING: "BYTES", mc.TYPE_BF16: "BF16",
}
NUMPY_DTYPES: dict[str, Any] = {
    "BOOL": np.bool_, "UINT8": np.uint8, "UINT16": np.uint16, "UINT32": np.uint32,
    "UINT64": np.uint64, "INT8": np.int8, "INT16": np.int16, "INT32": np.int32,
    "INT64": np.int64, "FP16": np.float16, "FP32": np.float32, "FP64": np.float64,
}
# Which InferTensorContents field holds each datatype.
_CONTENTS_FIELD = {
    "BOOL": "bool_contents", "INT8": "int_contents", "INT16": "int_contents",
    "INT32": "int_contents", "INT64": "int64_contents", "UINT8": "uint_contents",
    "UINT16": "uint_contents", "UINT32": "uint_contents", "UINT64": "uint64_contents",
    "FP32": "fp32_contents", "FP64": "fp64_contents", "BYTES": "bytes_contents",
}
# Inputs whose datatype may differ from the config: token ids come as INT32 or INT64.
_DTYPE_ALTERNATIVES = {"input_ids": ("INT32", "INT64")}


MAX_REQUEST_ID_CHARS = 1024


def log_prefix(request_id: str) -> str:
    """Triton prefixes request errors with the request id when there is one."""
    if len(request_id) > MAX_REQUEST_ID_CHARS:  # refused anyway: not worth quoting
        return ""
    return f"[request id: {request_id}] " if request_id else ""


def _dims(values: Any) -> str:
    return "[" + ",".join(str(v) for v in values) + "]"


def deserialize_bytes(buffer: bytes, name: str) -> list[bytes]:
    """Splits a raw BYTES tensor into its elements."""
    elements = []
    offset = 0
    while offset < len(buffer):
        if offset + 4 > len(buffer):
            raise TensorError(f"element byte size indicator exceeds the end of the buffer "
                              f"for input '{name}'")
        (length,) = struct.unpack_from("<I", buffer, offset)
        offset += 4
        if offset + length > len(buffer):
            raise TensorError(f"element byte size indicator exceeds the end of the buffer "
                              f"for input '{name}'")
        elements.append(bytes(buffer[offset:offset + length]))
        offset += length
    return elements


def serialize_bytes(array: np.ndarray) -> bytes:
    """Raw form of a BYTES tensor (row-major, each element length-prefixed)."""
    parts = []
    for item in array.reshape(-1):
        data = item if isinstance(item, bytes) else str(item).encode("utf-8")
        parts.append(struct.pack("<I", len(data)))
        parts.append(data)
    return b"".join(parts)


def _shape_matches(shape: list[int], dims: list[int]) -> bool:
    return len(shape) == len(dims) and all(d == -1 or d == s for s, d in zip(shape, dims))


def check_data_sources(request: pb.ModelInferRequest) -> None:
    """Refuses typed ``contents`` on an input of a request that uses ``raw_input_contents``:
    which bytes belong to which input would be ambiguous, so Triton's gRPC frontend refuses
    it (without the request id prefix, as it does) rather than pick one."""
    if not request.raw_input_contents:
        return
    for tensor in request.inputs:
        if tensor.HasField("contents"):
            raise TensorError("contents field must not be specified when using "
                              f"raw_input_contents for '{shown(tensor.name)}' for model "
                              f"'{request.model_name}'")


def check_requested_outputs(request: pb.ModelInferRequest, config: mc.ModelConfig) -> None:
    """Refuses an output named twice, or one the model does not have, in Triton's words: it
    would otherwise be silently left out of every response."""
    seen: set[str] = set()
    for output in request.outputs:
        if output.name in seen:
            raise TensorError(f"{log_prefix(request.id)}output '{shown(output.name)}' already "
                              "exists in request")
        seen.add(output.name)
    # Triton keeps the names in a sorted set, so the first unknown one in that order is named.
    unknown = sorted(seen - {o.name for o in config.output})
    if unknown:
        raise TensorError(f"unexpected inference output '{shown(unknown[0])}' for model "
                          f"'{config.name}'")


def read_inputs(request: pb.ModelInferRequest, config: mc.ModelConfig) -> dict[str, np.ndarray]:
    """The request's input tensors as arrays (BYTES as object arrays of ``bytes``).

    Raises ``TensorError`` with Triton's wording for inputs the model does not take, and for
    requested outputs it does not have. The order of the checks is Triton's: its frontend reads
    the data first, then its core checks the requested outputs before any input.
    """
    prefix = log_prefix(request.id)
    model = config.name
    expected = {i.name: i for i in config.input}
    check_data_sources(request)
    uses_raw = len(request.raw_input_contents) > 0
    if uses_raw and len(request.raw_input_contents) != len(request.inputs):
        raise TensorError(f"{prefix}expected {len(request.inputs)} raw input contents for "
                          f"model '{model}', got {len(request.raw_input_contents)}")
    check_requested_outputs(request, config)
    arrays: dict[str, np.ndarray] = {}
    for index, tensor in enumerate(request.inputs):
        name = tensor.name
        if name in arrays:
            raise TensorError(f"{prefix}input '{name}' already exists in request")
        spec = expected.get(name)
        if spec is None:
            raise TensorError(f"unexpected inference input '{name}' for model '{model}'")
        want = PROTOCOL_DTYPES.get(spec.data_type, "INVALID")
        allowed = _DTYPE_ALTERNATIVES.get(name, (want,))
        if tensor.datatype not in allowed:
            raise TensorError(f"{prefix}inference input '{name}' data-type is "
                              f"'{tensor.datatype}', but model '{model}' expects '{want}'")
        shape = list(tensor.shape)
        if any(s < 0 for s in shape) or not _shape_matches(shape, list(spec.dims)):
            raise TensorError(f"{prefix}unexpected shape for input '{name}' for model "
                              f"'{model}'. Expected {_dims(spec.dims)}, got {_dims(shape)}. ")
        count = int(np.prod(shape)) if shape else 1
        if uses_raw:
            raw = request.raw_input_contents[index]
            if tensor.datatype == "BYTES":
                array = np.array(deserialize_bytes(raw, name), dtype=np.object_)
            else:
                dtype = np.dtype(NUMPY_DTYPES[tensor.datatype])
                if len(raw) != count * dtype.itemsize:
                    raise TensorError(f"{prefix}input byte size mismatch for input '{name}' "
                                      f"for model '{model}'. Expected "
                                      f"{count * dtype.itemsize}, got {len(raw)}")
                array = np.frombuffer(raw, dtype=dtype).copy()
        else:
            field = _CONTENTS_FIELD.get(tensor.datatype)
            if field is None:
                raise TensorError(f"{prefix}input '{name}' of type {tensor.datatype} must be "
                                  "sent in raw_input_contents")
            values = list(getattr(tensor.contents, field))
            if tensor.datatype == "BYTES":
                array = np.array(values, dtype=np.object_)
            else:
                array = np.array(values, dtype=NUMPY_DTYPES[tensor.datatype])
        if array.size != count:
            raise TensorError(f"{prefix}unexpected number of elements for input '{name}' for "
                              f"model '{model}': shape {_dims(shape)} needs {count}, "
                              f"got {array.size}")
        arrays[name] = array.reshape(shape)
    missing = [i.name for i in config.input if not i.optional and i.name not in arrays]
    if missing:
        required = sum(1 for i in config.input if not i.optional)
        raise TensorError(
            f"{prefix}expected number of inputs between {required} and {len(config.input)} "
            f"but got {len(request.inputs)} inputs for model '{model}'. Got input(s) "
            f"{sorted(arrays)}, but missing required input(s) {missing}. Please provide all "
            "required input(s).")
    return arrays


def parameter_value(param: pb.InferParameter) -> Any:
    """The Python value of one InferParameter (``None`` if unset)."""
    choice = param.WhichOneof("parameter_choice")
    return None if choice is None else getattr(param, choice)


def request_parameters(request: pb.ModelInferRequest) -> dict[str, Any]:
    """The request's parameters by name; one sent without a value is refused, not ignored."""
    values = {k: parameter_value(v) for k, v in request.parameters.items()}
    empty = sorted(k for k, v in values.items() if v is None)
    if empty:
        raise TensorError(f"{log_prefix(request.id)}parameter '{empty[0][:64]}' has no value")
    return values


def check_request_id(request: pb.ModelInferRequest) -> None:
    """Bounds the id every response echoes back (Triton sets no limit; a megabyte id would be
    copied into each streamed token's response)."""
    if len(request.id) > MAX_REQUEST_ID_CHARS:
        raise TensorError(f"request id is {len(request.id)} characters long; at most "
                          f"{MAX_REQUEST_ID_CHARS} are accepted")


# The only ``triton_`` request parameter a client may send.
ALLOWED_TRITON_PARAMETERS = ("triton_enable_empty_final_response",)


def enable_empty_final(request: pb.ModelInferRequest) -> bool:
    """The ``triton_enable_empty_final_response`` flag; it must be a bool parameter.

    Also refuses every other ``triton_`` parameter, as Triton's frontend does before the request
    reaches the core (so before any input check, and with no request id prefix).
    """
    for key in request.parameters:
        if key.startswith("triton_") and key not in ALLOWED_TRITON_PARAMETERS:
            raise TensorError("parameter keys starting with 'triton_' are reserved for Triton "
                              "usage. Only the following keys starting with 'triton_' are "
                              f"allowed: {', '.join(ALLOWED_TRITON_PARAMETERS)}")
    param = request.parameters.get("triton_enable_empty_final_response")
    if param is None:
        return False
    if param.WhichOneof("parameter_choice") != "bool_param":
        raise TensorError("invalid value type for 'triton_enable_empty_final_response' "
                          "parameter, expected bool_param.")
    return param.bool_param


def _datatype(array: np.ndarray) -> str:
    if array.dtype == np.object_:
        return "BYTES"
    for name, dtype in NUMPY_DTYPES.items():
        if array.dtype == np.dtype(dtype):
            return name
    raise TypeError(f"no protocol datatype for {array.dtype}")


def build_response(request: pb.ModelInferRequest, model_version: str, config: mc.ModelConfig,
                   arrays: dict[str, np.ndarray] | None,
                   final: bool | None = None) -> pb.ModelInferResponse:
    """A response echoing the request's id with ``arrays`` as outputs, in config order.

    If the request named outputs, only those are sent (names it asked for that this request does
    not produce are left out, as the vLLM backend does). ``final`` sets the
    ``triton_final_response`` parameter when not ``None``.
    """
    response = pb.ModelInferResponse(model_name=config.name, model_version=model_version,
                                     id=request.id)
    if final is not None:
        response.parameters["triton_final_response"].bool_param = final
    if arrays:
        wanted = {o.name for o in request.outputs}
        for spec in config.output:
            array = arrays.get(spec.name)
            if array is None or (wanted and spec.name not in wanted):
                continue
            datatype = _datatype(array)
            response.outputs.add(name=spec.name, datatype=datatype, shape=list(array.shape))
            if datatype == "BYTES":
                response.raw_output_contents.append(serialize_bytes(array))
            else:
                response.raw_output_contents.append(np.ascontiguousarray(array).tobytes())
    return response
