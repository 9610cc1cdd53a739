"""Real Triton Inference Server as the protocol reference: an echo model repository and a runner.

The ``nvidia-pytriton`` wheel (installed with ``--no-deps`` by ``make setup-dev``) ships a real
``tritonserver`` 2.51 binary with its Python backend; it runs on a CPU. This module builds a
temporary model repository of echo-style Python models that have the inputs and outputs of
Triton's vLLM backend and runs ``tritonserver`` on it (``pagedserve.python_backend.host``'s runner,
on a free loopback port), so tests can check a behaviour against Triton itself
(``tests/server/test_parity.py``) and ``docs/triton-behaviour.md`` can record what Triton
answers.

Models written by :func:`make_echo_repository`:

* ``echo_vllm``: decoupled, vLLM backend's tensors. The "generation" is the prompt itself, split
  into word pieces (``"a b c"`` -> ``"a "``, ``"b "``, ``"c"``), capped by ``max_tokens`` of the
  ``sampling_parameters`` JSON (or request parameters). Streaming sends one response per piece,
  the last one flagged FINAL with its data, as the vLLM backend does; non-streaming sends one
  response with the whole text (prompt prepended unless ``exclude_input_in_output``).
  Backend-side errors are the vLLM backend's: ``exclude_input_in_output=false`` with
  ``stream=true``, or unparsable ``sampling_parameters``.
* ``echo_flags_final``: the same model, but it ends every request with a flags-only FINAL (no
  data), as many decoupled backends do: the case ``triton_enable_empty_final_response`` exists for.
* ``echo_unary``: not decoupled, the same tensors; one response per request.

Usage::

    with running_triton(make_echo_repository(tmp_path)) as triton:
        client = tritonclient.grpc.InferenceServerClient(triton.grpc_url)
"""

from __future__ import annotations

import socket
import sys
import tempfile
import time
from collections.abc import Iterator, Sequence
from contextlib import contextmanager, suppress
from pathlib import Path

from pagedserve.python_backend.host import Ports, TritonHost

# The vLLM backend's tensors (shared/reference/triton-wire.md §3), minus ``image`` and
# ``embedding_request``, which an echo has no use for.
_BOOL_INPUTS = ("stream", "exclude_input_in_output", "return_finish_reason",
                "return_cumulative_logprob", "return_logprobs", "return_num_input_tokens",
                "return_num_output_tokens")

_CONFIG = """\
name: "{name}"
backend: "python"
max_batch_size: 0
{policy}
input [
  {{ name: "text_input" data_type: TYPE_STRING dims: [ 1 ] }},
  {{ name: "sampling_parameters" data_type: TYPE_STRING dims: [ 1 ] optional: true }},
{bool_inputs}
]
output [
  {{ name: "text_output" data_type: TYPE_STRING dims: [ -1 ] }},
  {{ name: "finish_reason" data_type: TYPE_STRING dims: [ -1 ] }},
  {{ name: "cumulative_logprob" data_type: TYPE_FP32 dims: [ -1 ] }},
  {{ name: "logprobs" data_type: TYPE_STRING dims: [ -1 ] }},
  {{ name: "num_input_tokens" data_type: TYPE_UINT32 dims: [ 1 ] }},
  {{ name: "num_output_tokens" data_type: TYPE_UINT32 dims: [ -1 ] }}
]
parameters {{ key: "final_mode" value: {{ string_value: "{final_mode}" }} }}
instance_group [ {{ count: 1 kind: KIND_CPU }} ]
"""

# The model runs inside Triton's Python-backend stub, not in this process: it is source text.
_MODEL_PY = '''\
"""Echo model with the tensors of Triton's vLLM backend (written by tests/triton_ref.py)."""

import json
import re

import numpy as np
import triton_python_backend_utils as pb_utils


def _bool(request, name, default):
    tensor = pb_utils.get_input_tensor_by_name(request, name)
    return default if tensor is None else bool(tensor.as_numpy().reshape(-1)[0])


class TritonPythonModel:
    def initialize(self, args):
        config = json.loads(args["model_config"])
        self.decoupled = pb_utils.using_decoupled_model_transaction_policy(config)
        self.final_mode = config["parameters"]["final_mode"]["string_value"]

    def execute(self, requests):
        if not self.decoupled:
            return [self._respond_unary(r) for r in requests]
        for request in requests:
            self._stream(request)
        return None

    def _parse(self, request):
        prompt = pb_utils.get_input_tensor_by_name(request, "text_input").as_numpy()
        prompt = prompt.reshape(-1)[0].decode("utf-8")
        sp = pb_utils.get_input_tensor_by_name(request, "sampling_parameters")
        raw = sp.as_numpy().reshape(-1)[0].decode("utf-8") if sp is not None \\
            else request.parameters()
        try:
            params = json.loads(raw)
        except ValueError as exc:
            raise pb_utils.TritonModelException(f"Error generating stream: {exc}") from exc
        stream = _bool(request, "stream", False)
        exclude = pb_utils.get_input_tensor_by_name(request, "exclude_input_in_output")
        if exclude is None:
            prepend = not stream
        else:
            prepend = not bool(exclude.as_numpy().reshape(-1)[0])
        if prepend and stream:
            raise pb_utils.TritonModelException(
                "Error generating stream: When streaming, `exclude_input_in_output` = False "
                "is not allowed.")
        pieces = re.findall(r"\\S+\\s*|\\s+", prompt)
        max_tokens = int(params.get("max_tokens", 16))
        reason = "length" if len(pieces) > max_tokens else "stop"
        return prompt, pieces[:max_tokens], stream, prepend, reason, len(pieces)

    def _tensors(self, request, text, reason, n_in, n_out):
        out = [pb_utils.Tensor("text_output", np.array([text.encode()], dtype=np.object_))]
        extra = {
            "return_finish_reason": lambda: pb_utils.Tensor(
                "finish_reason", np.array([reason.encode()], dtype=np.object_)),
            "return_cumulative_logprob": lambda: pb_utils.Tensor(
                "cumulative_logprob", np.array([0.0], dtype=np.float32)),
            "return_logprobs": lambda: pb_utils.Tensor(
                "logprobs", np.array([b"null"], dtype=np.object_)),
            "return_num_input_tokens": lambda: pb_utils.Tensor(
                "num_input_tokens", np.array([n_in], dtype=np.uint32)),
            "return_num_output_tokens": lambda: pb_utils.Tensor(
                "num_output_tokens", np.array([n_out], dtype=np.uint32)),
        }
        out += [make() for flag, make in extra.items() if _bool(request, flag, False)]
        return out

    def _respond_unary(self, request):
        try:
            prompt, pieces, _, prepend, reason, n_in = self._parse(request)
        except pb_utils.TritonModelException as exc:
            return pb_utils.InferenceResponse(error=pb_utils.TritonError(str(exc)))
        text = (prompt if prepend else "") + "".join(pieces)
        return pb_utils.InferenceResponse(
            self._tensors(request, text, reason, n_in, len(pieces)))

    def _stream(self, request):
        sender = request.get_response_sender()
        final = pb_utils.TRITONSERVER_RESPONSE_COMPLETE_FINAL
        try:
            prompt, pieces, stream, prepend, reason, n_in = self._parse(request)
        except pb_utils.TritonModelException as exc:
            sender.send(pb_utils.InferenceResponse(error=pb_utils.TritonError(str(exc))),
                        flags=final)
            return
        if not stream:
            pieces = [(prompt if prepend else "") + "".join(pieces)]
        for i, piece in enumerate(pieces):
            last = i == len(pieces) - 1
            tensors = self._tensors(request, piece, reason if last else "None", n_in, 1)
            flags = final if last and self.final_mode == "with_data" else 0
            sender.send(pb_utils.InferenceResponse(tensors), flags=flags)
        if self.final_mode != "with_data" or not pieces:
            sender.send(flags=final)
'''

# name -> (decoupled, final_mode)
ECHO_MODELS = {
    "echo_vllm": (True, "with_data"),
    "echo_flags_final": (True, "flags_only"),
    "echo_unary": (False, "with_data"),
}


def make_echo_repository(root: Path, models: Sequence[str] = tuple(ECHO_MODELS)) -> Path:
    """Writes the echo models (see the module docstring) under ``root/repo``; returns the repo."""
    repo = root / "repo"
    bool_inputs = ",\n".join(
        f'  {{ name: "{name}" data_type: TYPE_BOOL dims: [ 1 ] optional: true }}'
        for name in _BOOL_INPUTS)
    for name in models:
        decoupled, final_mode = ECHO_MODELS[name]
        policy = "model_transaction_policy { decoupled: true }" if decoupled else ""
        (repo / name / "1").mkdir(parents=True, exist_ok=True)
        (repo / name / "config.pbtxt").write_text(_CONFIG.format(
            name=name, policy=policy, bool_inputs=bool_inputs, final_mode=final_mode))
        (repo / name / "1" / "model.py").write_text(_MODEL_PY)
    return repo


def free_port() -> int:
    """A loopback port free right now (the OS picks it)."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


@contextmanager
def running_triton(repo: Path, extra_args: Sequence[str] = (), http: bool = False
                   ) -> Iterator[TritonHost]:
    """``tritonserver`` serving ``repo`` over gRPC on a free loopback port, and over HTTP on
    another with ``http`` (metrics off), for the duration of the block."""
    server = TritonHost(repo, Ports(grpc=free_port(), http=free_port() if http else 0),
                        extra_args)
    server.start()
    try:
        yield server
    finally:
        server.stop()


def main() -> None:
    """``python -m tests.triton_ref [SECONDS]``: serve the echo repository in the foreground."""
    seconds = float(sys.argv[1]) if len(sys.argv) > 1 else 3600.0
    with tempfile.TemporaryDirectory() as tmp, \
            running_triton(make_echo_repository(Path(tmp))) as triton:
        print(f"tritonserver ready: grpc {triton.grpc_url}, models {', '.join(ECHO_MODELS)}",
              flush=True)
        with suppress(KeyboardInterrupt):
            time.sleep(seconds)


if __name__ == "__main__":
    main()
