"""Tensors of Triton's vLLM backend ↔ engine requests and outputs.

Pure mapping with numpy arrays on both sides and neither gRPC nor Triton's ``pb_utils`` in it:
our server (``backend/server``) and the Triton Python-backend model (``backend/python_backend``)
both use it. ``parse_request`` turns a request's input arrays (and its request
parameters) into a ``GenerateRequest``; a ``ResponseBuilder`` turns the engine's successive
``RequestOutput``s into output arrays, text deltas when streaming, the whole completion
otherwise. Semantics follow the vLLM backend (``src/utils/request.py``, ``model.py``):

* ``sampling_parameters`` (a JSON object) wins over request parameters; string values are cast
  to the parameter's type (``"128"`` → 128), as the backend does; its ``lora_name`` names the
  LoRA adapter (``GenerateRequest.lora_name``), not a sampling parameter; its
  ``structured_outputs`` (or the older ``guided_decoding``) is a JSON string of
  ``StructuredOutputsParams`` fields (a JSON object works too);
* ``exclude_input_in_output`` absent: the prompt is prepended when not streaming only;
  ``False`` while streaming is an error;
* ``finish_reason`` is ``str(reason)`` (``"None"`` while running), ``logprobs`` a JSON list of
  ``{token_id: {"logprob", "rank", "decoded_token"}}`` for the tokens since the last response.

pagedserve adds ``input_ids`` (INT32/INT64 token ids instead of ``text_input``) and
``output_ids`` (INT64 generated ids; shape ``[n, L]`` padded with -1 when ``n > 1``).
"""

from __future__ import annotations

import json
import types
from collections.abc import Callable
from dataclasses import dataclass, fields
from functools import lru_cache
from typing import Any, Union, get_args, get_origin, get_type_hints

import numpy as np

from pagedserve.engine.input_processor import AdmissionLimits
from pagedserve.outputs import RequestOutput
from pagedserve.repository.names import shown
from pagedserve.sampling_params import SamplingParams
from pagedserve.structured_outputs import StructuredOutputsParams

# Request parameters that are Triton's own, never sampling parameters.
RESERVED_PARAMETERS = frozenset({"sequence_id", "sequence_start", "sequence_end", "priority",
                                 "timeout", "headers", "binary_data_output"})

# The key of ``sampling_parameters`` (or request parameter) that names a LoRA adapter.
LORA_NAME = "lora_name"
GUIDED_DECODING = "guided_decoding"

# return_<flag> input -> the output it switches on.
_FLAG_OUTPUTS = {
    "return_finish_reason": "finish_reason",
    "return_cumulative_logprob": "cumulative_logprob",
    "return_logprobs": "logprobs",
    "return_num_input_tokens": "num_input_tokens",
    "return_num_output_tokens": "num_output_tokens",
}


class TensorError(ValueError):
    """A bad request (Triton INVALID_ARG); the message names the tensor or parameter."""


@dataclass
class GenerateRequest:
    """What the engine needs for one inference request, plus how to answer it."""

    prompt: str | None
    prompt_token_ids: list[int] | None
    params: SamplingParams
    stream: bool
    prepend_input: bool
    outputs: frozenset[str]  # the outputs this request produces
    # The LoRA adapter the request names (``lora_name``, as the vLLM backend reads it from
    # ``sampling_parameters`` or the request parameters), checked against the model's adapters
    # by the caller (``pagedserve.repository.lora``); None: the base model.
    lora_name: Any = None


def _scalar(inputs: dict[str, np.ndarray], name: str) -> Any:
    array = inputs.get(name)
    if array is None:
        return None
    if array.size != 1:
        raise TensorError(f"input '{name}' must hold exactly one element, got {array.size}")
    return array.reshape(-1)[0]


def _flag(inputs: dict[str, np.ndarray], name: str) -> bool | None:
    value = _scalar(inputs, name)
    return None if value is None else bool(value)


def _field_types() -> dict[str, Any]:
    """SamplingParams field -> its resolved type (fields added later are covered too)."""
    hints = get_type_hints(SamplingParams)
    return {f.name: hints.get(f.name, Any) for f in fields(SamplingParams)}


def _base_type(annotation: Any) -> Any:
    """``int | None`` → ``int``; other annotations unchanged."""
    origin = get_origin(annotation)
    if origin is Union or origin is types.UnionType:
        args = [a for a in get_args(annotation) if a is not type(None)]
        if len(args) == 1:
            return args[0]
    return annotation


def _cast(name: str, value: Any, annotation: Any) -> Any:
    """Casts a string value to a scalar field's type, as the vLLM backend does."""
    base = _base_type(annotation)
    if not isinstance(value, str) or base not in (int, float, bool):
        return value
    text = value.strip()
    if base is bool:
        if text.lower() in ("true", "1"):
            return True
        if text.lower() in ("false", "0"):
            return False
    else:
        try:
            return base(text) if base is float else int(text)
        except ValueError:
            pass
    raise TensorError(f"sampling parameter '{name}' must be of type {base.__name__}, "
                      f"got {value!r}")


def sampling_params_from(values: dict[str, Any]) -> SamplingParams:
    """Validated ``SamplingParams``; unknown or out-of-range parameters raise naming the field."""
    types_ = _field_types()
    cast = {k: _cast(k, v, types_[k]) if k in types_ else v for k, v in values.items()}
    try:
        return SamplingParams.from_dict(cast)
    except (TypeError, ValueError) as e:
        raise TensorError(f"invalid sampling_parameters: {e}") from None


class OversizedInteger:
    """A JSON integer too long to convert (Python refuses over 4300 digits): kept as its length,
    so the field that holds it is the one the error names."""

    def __init__(self, digits: int) -> None:
        self.digits = digits

    def __repr__(self) -> str:
        return f"<integer of {self.digits} digits>"


def _json_int(text: str) -> int | OversizedInteger:
    return int(text) if len(text) <= 40 else OversizedInteger(len(text))


def _unique_keys(pairs: list[tuple[str, Any]]) -> dict[str, Any]:
    """A JSON object's members, refused if a key repeats: ``json`` would keep the last value
    silently, where another parser keeps the first, so the client's intent is unknowable."""
    values: dict[str, Any] = {}
    for key, value in pairs:
        if key in values:
            raise TensorError(f"input 'sampling_parameters' holds the key '{shown(key)}' "
                              "more than once")
        values[key] = value
    return values


def _sampling_values(inputs: dict[str, np.ndarray], parameters: dict[str, Any]) -> dict[str, Any]:
    raw = _scalar(inputs, "sampling_parameters")
    if raw is None:
        return {k: v for k, v in parameters.items()
                if k not in RESERVED_PARAMETERS and not k.startswith("triton_")}
    try:
        text = raw.decode("utf-8") if isinstance(raw, bytes) else str(raw)
        values = json.loads(text, parse_int=_json_int, object_pairs_hook=_unique_keys)
    except TensorError:  # a repeated key: a ValueError too, but not a JSON syntax error
        raise
    except RecursionError:
        raise TensorError("input 'sampling_parameters' is nested too deeply") from None
    except ValueError as e:  # bad JSON or UTF-8, or an integer of more digits than Python parses
        raise TensorError(f"input 'sampling_parameters' is not valid JSON: {e}") from None
    if not isinstance(values, dict):
        raise TensorError("input 'sampling_parameters' must be a JSON object, got "
                          f"{type(values).__name__}")
    return values


def _prompt(inputs: dict[str, np.ndarray], limits: AdmissionLimits | None
            ) -> tuple[str | None, list[int] | None]:
    """The prompt, refused by its size alone when it cannot fit the model's context, before
    it is decoded or copied (a hostile prompt costs no more than its message)."""
    text = _scalar(inputs, "text_input")
    ids = inputs.get("input_ids")
    if text is not None and ids is not None:
        raise TensorError("give either input 'text_input' or input 'input_ids', not both")
    if ids is not None:
        if limits is not None and ids.size >= limits.max_model_len:
            raise TensorError(f"input 'input_ids' holds {ids.size} tokens; the maximum context "
                              f"length is {limits.max_model_len} (prompt plus at least one "
                              "generated token)")
        token_ids = [int(t) for t in ids.reshape(-1)]
        if not token_ids:
            raise TensorError("input 'input_ids' must not be empty")
        return None, token_ids
    if text is None:
        raise TensorError("one of the inputs 'text_input' or 'input_ids' is required")
    # A character takes at most 4 UTF-8 bytes, so more bytes than this are too many characters.
    if limits is not None and len(text) > 4 * limits.max_prompt_chars:
        raise TensorError(f"input 'text_input' is {len(text)} bytes long; no prompt over "
                          f"{limits.max_prompt_chars} characters fits the maximum context "
                          f"length of {limits.max_model_len} tokens")
    if isinstance(text, bytes):
        try:
            text = text.decode("utf-8")
        except UnicodeDecodeError as e:
            raise TensorError(f"input 'text_input' is not valid UTF-8: {e}") from None
    prompt = str(text)
    if not prompt:
        raise TensorError("input 'text_input' must not be empty")
    return prompt, None


def parse_request(inputs: dict[str, np.ndarray], parameters: dict[str, Any] | None = None,
                  requested_outputs: frozenset[str] | None = None,
                  limits: AdmissionLimits | None = None) -> GenerateRequest:
    """Maps a request's inputs (by name) and request parameters onto a ``GenerateRequest``.

    ``requested_outputs`` (the outputs a client named, if any) switches on ``output_ids``;
    ``limits`` (the engine's) refuse a prompt too large to fit before it is decoded.
    Raises ``TensorError`` naming the offending input or parameter.
    """
    prompt, token_ids = _prompt(inputs, limits)
    stream = bool(_flag(inputs, "stream"))
    exclude = _flag(inputs, "exclude_input_in_output")
    if exclude is False and stream:
        # The vLLM backend raises this inside its generate loop, hence the prefix.
        raise TensorError("Error generating stream: When streaming, `exclude_input_in_output` "
                          "= False is not allowed.")
    prepend = (not exclude) if exclude is not None else not stream
    values = _sampling_values(inputs, parameters or {})
    lora_name = values.pop(LORA_NAME, None)  # the vLLM backend's key, no sampling parameter
    if GUIDED_DECODING in values:
        # The vLLM backend's older key for the same constraint (GuidedDecodingParams).
        if "structured_outputs" in values:
            raise TensorError("invalid sampling_parameters: give structured_outputs or "
                              "guided_decoding, not both")
        try:
            values["structured_outputs"] = StructuredOutputsParams.from_value(
                values.pop(GUIDED_DECODING), GUIDED_DECODING)
        except ValueError as e:
            raise TensorError(f"invalid sampling_parameters: {e}") from None
    params = sampling_params_from(values)
    outputs = {"text_output"}
    outputs.update(out for flag, out in _FLAG_OUTPUTS.items() if _flag(inputs, flag))
    if token_ids is not None or (requested_outputs and "output_ids" in requested_outputs):
        outputs.add("output_ids")
    return GenerateRequest(prompt, token_ids, params, stream, prepend and prompt is not None,
                           frozenset(outputs), lora_name)


def _bytes_array(values: list[str]) -> np.ndarray:
    return np.array([v.encode("utf-8") for v in values], dtype=np.object_)


def _ids_array(rows: list[list[int]]) -> np.ndarray:
    if len(rows) == 1:
        return np.array(rows[0], dtype=np.int64)
    width = max((len(r) for r in rows), default=0)
    out = np.full((len(rows), width), -1, dtype=np.int64)
    for i, row in enumerate(rows):
        out[i, :len(row)] = row
    return out


def token_decoder(tokenizer: Any) -> Callable[[int], str]:
    """Token id → its text, cached: ``decoded_token`` of every logprob candidate."""
    @lru_cache(maxsize=65536)
    def decode(token: int) -> str:
        return str(tokenizer.decode([token]))
    return decode


class ResponseBuilder:
    """Builds the output arrays of one request's responses.

    ``decode_token`` (token id → text) fills ``decoded_token`` in ``logprobs``; without it the
    field is ``None``.
    """

    def __init__(self, request: GenerateRequest,
                 decode_token: Callable[[int], str] | None = None) -> None:
        self.request = request
        self._decode = decode_token
        self._sent_logprobs: dict[int, int] = {}  # sequence index -> positions already sent

    def _logprobs_json(self, out: RequestOutput) -> list[str]:
        texts = []
        for seq in out.outputs:
            if seq.logprobs is None:
                texts.append("null")
                continue
            start = self._sent_logprobs.get(seq.index, 0)
            self._sent_logprobs[seq.index] = len(seq.logprobs)
            positions = []
            for position in seq.logprobs[start:]:
                ranked = sorted(position.items(), key=lambda kv: -kv[1])
                positions.append({str(token): {
                    "logprob": logprob, "rank": rank,
                    "decoded_token": self._decode(token) if self._decode else None}
                    for rank, (token, logprob) in enumerate(ranked, start=1)})
            texts.append(json.dumps(positions))
        return texts

    def _arrays(self, out: RequestOutput, texts: list[str],
                new_ids: list[list[int]]) -> dict[str, np.ndarray]:
        want = self.request.outputs
        arrays = {"text_output": _bytes_array(texts)}
        if "finish_reason" in want:
            arrays["finish_reason"] = _bytes_array([str(s.finish_reason) for s in out.outputs])
        if "cumulative_logprob" in want:
            arrays["cumulative_logprob"] = np.array(
                [s.cumulative_logprob or 0.0 for s in out.outputs], dtype=np.float32)
        if "logprobs" in want:
            arrays["logprobs"] = _bytes_array(self._logprobs_json(out))
        if "num_input_tokens" in want:
            arrays["num_input_tokens"] = np.array([len(out.prompt_token_ids)], dtype=np.uint32)
        if "num_output_tokens" in want:
            arrays["num_output_tokens"] = np.array([len(i) for i in new_ids], dtype=np.uint32)
        if "output_ids" in want:
            arrays["output_ids"] = _ids_array(new_ids)
        return arrays

    def delta(self, out: RequestOutput) -> dict[str, np.ndarray]:
        """Outputs of one streamed step: only what it added to each sequence."""
        texts = list(out.delta_texts) or ["" for _ in out.outputs]
        ids = list(out.delta_token_ids) or [[] for _ in out.outputs]
        return self._arrays(out, texts, ids)

    def whole(self, out: RequestOutput) -> dict[str, np.ndarray]:
        """Outputs of a finished request in one response (prompt prepended if asked)."""
        prefix = (self.request.prompt or "") if self.request.prepend_input else ""
        texts = [prefix + s.text for s in out.outputs]
        return self._arrays(out, texts, [list(s.token_ids) for s in out.outputs])
