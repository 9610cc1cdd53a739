"""``config.pbtxt`` → ``ModelConfig``: parse, apply a load-time override, fill vLLM defaults.

The defaults mirror the ``auto_complete_config`` of Triton's vLLM backend (decoupled,
``max_batch_size: 0``, its input and output tensors) plus pagedserve's token-id tensors, so a
repository written for that backend loads unchanged and a bare ``backend: "vllm"`` config works.
A config that names a tensor twice, or gives the prompt or sampling JSON a type other than a
string, fails its load with a message naming the tensor.
"""

from __future__ import annotations

from pathlib import Path

import grpc
from google.protobuf import json_format, text_format

from pagedserve.protocol import model_config_pb2 as mc
from pagedserve.repository.errors import RepositoryError
from pagedserve.repository.names import shown
from pagedserve.repository.paths import require_within

# Backends whose configs this server executes with its own engine.
SUPPORTED_BACKENDS = ("vllm", "pagedserve")

VLLM_INPUTS: list[tuple[str, int, list[int], bool]] = [
    ("text_input", mc.TYPE_STRING, [1], False),
    ("stream", mc.TYPE_BOOL, [1], True),
    ("sampling_parameters", mc.TYPE_STRING, [1], True),
    ("exclude_input_in_output", mc.TYPE_BOOL, [1], True),
    ("return_finish_reason", mc.TYPE_BOOL, [1], True),
    ("return_cumulative_logprob", mc.TYPE_BOOL, [1], True),
    ("return_logprobs", mc.TYPE_BOOL, [1], True),
    ("return_num_input_tokens", mc.TYPE_BOOL, [1], True),
    ("return_num_output_tokens", mc.TYPE_BOOL, [1], True),
    ("input_ids", mc.TYPE_INT64, [-1], True),  # pagedserve: token ids in, for clients that tokenize
]
VLLM_OUTPUTS: list[tuple[str, int, list[int]]] = [
    ("text_output", mc.TYPE_STRING, [-1]),
    ("finish_reason", mc.TYPE_STRING, [-1]),
    ("cumulative_logprob", mc.TYPE_FP32, [-1]),
    ("logprobs", mc.TYPE_STRING, [-1]),
    ("num_input_tokens", mc.TYPE_UINT32, [1]),
    ("num_output_tokens", mc.TYPE_UINT32, [-1]),
    ("output_ids", mc.TYPE_INT64, [-1]),  # pagedserve: the generated token ids
]

# Inputs the engine reads as one type only (the others it reads by truthiness, as the vLLM
# backend does): a prompt or sampling JSON of another type could never be served.
_INPUT_TYPES: dict[str, tuple[int, ...]] = {
    "text_input": (mc.TYPE_STRING,),
    "sampling_parameters": (mc.TYPE_STRING,),
    "input_ids": (mc.TYPE_INT32, mc.TYPE_INT64),
}


def parse_config(text: str, source: str = "config.pbtxt") -> mc.ModelConfig:
    """Parses text-format ``ModelConfig``; errors name ``source``."""
    config = mc.ModelConfig()
    try:
        text_format.Parse(text, config)
    except text_format.ParseError as e:
        raise RepositoryError(grpc.StatusCode.INVALID_ARGUMENT,
                              f"failed to parse {source}: {e}") from None
    return config


def parse_override(json_text: str) -> mc.ModelConfig:
    """Parses the JSON ``config`` parameter of RepositoryModelLoad (replaces the file's config)."""
    config = mc.ModelConfig()
    try:
        json_format.Parse(json_text, config)
    except json_format.ParseError as e:
        # The parser quotes the client's text: bounded and escaped like a name.
        raise RepositoryError(grpc.StatusCode.INVALID_ARGUMENT,
                              "failed to parse the 'config' parameter as a ModelConfig: "
                              f"{shown(str(e), 256)}") from None
    return config


def load_config(model_dir: Path, override: str | None = None) -> mc.ModelConfig:
    """The completed config of the model in ``model_dir`` (``override`` JSON wins if given).

    ``config.pbtxt`` must lie in the model's folder (a symlink out of it is refused); errors
    name it relative to the model, never by absolute path.
    """
    if override is not None:
        config = parse_override(override)
    else:
        path = model_dir / "config.pbtxt"
        if path.is_file():
            require_within(path, model_dir, "config.pbtxt", model_dir.name)
            config = parse_config(path.read_text(encoding="utf-8"), "config.pbtxt")
        else:
            config = mc.ModelConfig()
    return complete_config(config, model_dir.name)


def complete_config(config: mc.ModelConfig, name: str) -> mc.ModelConfig:
    """Validates ``config`` for model ``name`` and fills what the vLLM backend would."""
    if config.name and config.name != name:
        raise RepositoryError(grpc.StatusCode.INVALID_ARGUMENT,
                              f"unexpected 'name' '{shown(config.name)}' in model configuration, "
                              f"expecting '{name}'")
    config.name = name
    backend = config.backend or config.platform
    if not backend:
        config.backend = "vllm"
    elif backend not in SUPPORTED_BACKENDS:
        raise RepositoryError(grpc.StatusCode.INVALID_ARGUMENT,
                              f"unsupported backend '{shown(backend)}' for model '{name}': "
                              f"pagedserve serves {', '.join(repr(b) for b in SUPPORTED_BACKENDS)}")
    if config.max_batch_size != 0:
        raise RepositoryError(grpc.StatusCode.INVALID_ARGUMENT,
                              f"model '{name}': max_batch_size must be 0 (the engine batches "
                              "continuously on its own)")
    check_tensors(config, name)
    if not config.HasField("model_transaction_policy"):
        config.model_transaction_policy.decoupled = True
    have_inputs = {i.name for i in config.input}
    for in_name, dtype, dims, optional in VLLM_INPUTS:
        if in_name not in have_inputs:
            config.input.add(name=in_name, data_type=dtype, dims=dims, optional=optional)
    have_outputs = {o.name for o in config.output}
    for out_name, dtype, dims in VLLM_OUTPUTS:
        if out_name not in have_outputs:
            config.output.add(name=out_name, data_type=dtype, dims=dims)
    if not config.instance_group:
        config.instance_group.add(count=1, kind=mc.ModelInstanceGroup.KIND_MODEL)
    if not config.HasField("version_policy"):
        config.version_policy.latest.num_versions = 1
    return config


def _invalid(message: str) -> RepositoryError:
    return RepositoryError(grpc.StatusCode.INVALID_ARGUMENT, message)


def _check_unique(kind: str, names: list[str], model: str) -> None:
    """Triton keeps only the first of two tensors of one name; which one a client meets would
    depend on where it looks (metadata lists both), so the load fails instead."""
    seen: set[str] = set()
    for tensor in names:
        if tensor in seen:
            raise _invalid(f"{kind} '{shown(tensor)}' for model '{model}' is declared more than "
                           "once in its configuration")
        seen.add(tensor)


def check_tensors(config: mc.ModelConfig, name: str) -> None:
    """Refuses tensors the engine could not serve: a name declared twice, or one of the
    backend's inputs with a type it cannot read (worded as Triton's Python backend words a
    config that contradicts a model's own tensor)."""
    _check_unique("input", [i.name for i in config.input], name)
    _check_unique("output", [o.name for o in config.output], name)
    for tensor in config.input:
        allowed = _INPUT_TYPES.get(tensor.name)
        if allowed is not None and tensor.data_type not in allowed:
            provides = " or ".join(_type_name(t) for t in allowed)
            raise _invalid(f"unable to load model '{name}', configuration expects datatype "
                           f"{_type_name(tensor.data_type)} for input '{tensor.name}', "
                           f"model provides {provides}")


def _type_name(value: int) -> str:
    """A DataType's name; a number outside the enum (proto3 keeps those) as the number."""
    try:
        return mc.DataType.Name(value)
    except ValueError:
        return str(value)
