"""Streams one completion over Triton's gRPC protocol and prints its tokens as they arrive.

    python clients/stream.py "The capital of France is" [--url 127.0.0.1:8001] [--model smollm2]
        [--max-tokens 64] [--temperature 0] [--chat]

Uses only the official ``tritonclient.grpc`` (ModelStreamInfer with the tensors of Triton's
vLLM backend), so it works against our server and against Triton's vLLM backend alike. Exits 1
with the server's message when the request fails.
"""

from __future__ import annotations

import argparse
import json
import queue
import sys
import uuid

import numpy as np
import tritonclient.grpc as grpcclient
from tritonclient.utils import InferenceServerException


def build_inputs(prompt: str, max_tokens: int, temperature: float,
                 stream: bool = True) -> list[grpcclient.InferInput]:
    """The vLLM backend's request tensors: prompt, streaming on, prompt left out of the output,
    sampling parameters as a JSON string."""
    sampling = json.dumps({"max_tokens": max_tokens, "temperature": temperature})
    values = [("text_input", "BYTES", np.array([prompt.encode()], dtype=np.object_)),
              ("stream", "BOOL", np.array([stream])),
              ("exclude_input_in_output", "BOOL", np.array([True])),
              ("sampling_parameters", "BYTES", np.array([sampling.encode()], dtype=np.object_))]
    inputs = []
    for name, datatype, array in values:
        tensor = grpcclient.InferInput(name, list(array.shape), datatype)
        tensor.set_data_from_numpy(array)
        inputs.append(tensor)
    return inputs


def is_final(result: grpcclient.InferResult) -> bool:
    """Triton marks the last response of a request with ``triton_final_response``."""
    return result.get_response().parameters["triton_final_response"].bool_param


def stream_completion(url: str, model: str, prompt: str, max_tokens: int,
                      temperature: float, out=sys.stdout) -> str:
    """Sends one streaming request; writes each text delta to ``out`` when it arrives and
    returns the whole text. Raises ``InferenceServerException`` on a server error."""
    events: queue.Queue = queue.Queue()
    client = grpcclient.InferenceServerClient(url)
    request_id = uuid.uuid4().hex
    pieces: list[str] = []
    try:
        client.start_stream(callback=lambda result, error: events.put((result, error)))
        client.async_stream_infer(model, build_inputs(prompt, max_tokens, temperature),
                                  request_id=request_id, enable_empty_final_response=True)
        while True:
            result, error = events.get()
            if error is not None:
                raise error
            if result.get_response().outputs:
                text = b"".join(result.as_numpy("text_output").tolist()).decode("utf-8")
                pieces.append(text)
                out.write(text)
                out.flush()
            if is_final(result):
                return "".join(pieces)
    finally:
        client.stop_stream()
        client.close()


def chat_prompt(message: str) -> str:
    """The embedded SmolLM2-Instruct chat template for one user message (ChatML)."""
    return f"<|im_start|>user\n{message}<|im_end|>\n<|im_start|>assistant\n"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("prompt")
    parser.add_argument("--url", default="127.0.0.1:8001", help="gRPC host:port")
    parser.add_argument("--model", default="smollm2")
    parser.add_argument("--max-tokens", type=int, default=64)
    parser.add_argument("--temperature", type=float, default=0.0)
    parser.add_argument("--chat", action="store_true",
                        help="wrap the prompt in the SmolLM2 chat template")
    args = parser.parse_args(argv)
    prompt = chat_prompt(args.prompt) if args.chat else args.prompt
    try:
        stream_completion(args.url, args.model, prompt, args.max_tokens, args.temperature)
    except InferenceServerException as exc:
        print(f"\nerror: {exc.message()}", file=sys.stderr)
        return 1
    print()
    return 0


if __name__ == "__main__":
    sys.exit(main())
