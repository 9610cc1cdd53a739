"""One inference request through the engine: decode, generate, encode, account.

Shared by unary ``ModelInfer`` and streaming ``ModelStreamInfer``. A request either fails before
the engine admits it (bad tensors, bad sampling parameters, a prompt the engine rejects) or runs
to completion; cancelling the task that drives ``responses`` aborts it in the engine at once.
"""

from __future__ import annotations

import time
import uuid
from collections.abc import AsyncGenerator, AsyncIterator, Mapping
from contextlib import aclosing
from typing import Any

import grpc

from pagedserve.engine.async_engine import EngineOverloaded
from pagedserve.outputs import RequestOutput
from pagedserve.protocol import grpc_service_pb2 as pb
from pagedserve.repository import ModelVersion
from pagedserve.server.wire import (
    build_response,
    check_request_id,
    enable_empty_final,
    log_prefix,
    read_inputs,
    request_parameters,
)
from pagedserve.tensors import (
    GenerateRequest,
    ResponseBuilder,
    TensorError,
    parse_request,
    token_decoder,
)

_TRACE_HEADERS = ("traceparent", "tracestate")


class InferError(Exception):
    """A request failure with its gRPC status code; ``started`` once the engine admitted it."""

    def __init__(self, code: grpc.StatusCode, message: str, started: bool = False) -> None:
        super().__init__(message)
        self.code = code
        self.message = message
        self.started = started


def trace_headers(context: Any) -> dict[str, str] | None:
    """The W3C trace context (``traceparent``, ``tracestate``) a call's metadata carries."""
    metadata = (context.invocation_metadata() if context is not None else None) or ()
    headers = {key: value for key, value in metadata
               if key in _TRACE_HEADERS and isinstance(value, str)}
    return headers or None


class Inference:
    """Drives one ``ModelInferRequest`` against one model version."""

    def __init__(self, model: ModelVersion, request: pb.ModelInferRequest,
                 trace_headers: Mapping[str, str] | None = None) -> None:
        self.model = model
        self.request = request
        self.trace_headers = trace_headers
        self.version = str(model.version)
        self._t0 = time.monotonic_ns()
        self._input_ns = 0
        self._output_ns = 0

    def prepare(self) -> tuple[GenerateRequest, bool]:
        """Validates the request; returns it and whether an empty final response was asked."""
        try:
            check_request_id(self.request)
            empty_final = enable_empty_final(self.request)
            arrays = read_inputs(self.request, self.model.config)
            requested = frozenset(o.name for o in self.request.outputs)
            generate = parse_request(arrays, request_parameters(self.request), requested,
                                     self.model.engine.limits)
        except TensorError as e:
            self._fail()
            raise InferError(grpc.StatusCode.INVALID_ARGUMENT, str(e)) from None
        self._input_ns = time.monotonic_ns() - self._t0
        return generate, empty_final

    def _respond(self, arrays: Any, final: bool | None) -> pb.ModelInferResponse:
        start = time.monotonic_ns()
        response = build_response(self.request, self.version, self.model.config, arrays, final)
        self._output_ns += time.monotonic_ns() - start
        return response

    def _fail(self) -> None:
        self.model.stats.record(False, time.monotonic_ns() - self._t0)

    async def responses(self, generate: GenerateRequest, streaming: bool, empty_final: bool
                        ) -> AsyncIterator[pb.ModelInferResponse]:
        """Yields the responses: deltas when ``streaming`` and the request streams, else one.

        ``triton_final_response`` is set on every response of a stream; with ``empty_final`` the
        last data response is not final and an output-less final response follows.
        """
        builder = ResponseBuilder(generate, token_decoder(self.model.tokenizer))
        deltas = streaming and generate.stream and self.model.decoupled
        submitted = time.monotonic_ns()
        first_ns: int | None = None
        engine_id = uuid.uuid4().hex  # client ids repeat across streams; the engine's must not
        ok = False
        try:
            stream: AsyncGenerator[RequestOutput, None] = self.model.engine.generate(  # type: ignore[assignment]
                generate.prompt, generate.params, request_id=engine_id,
                prompt_token_ids=generate.prompt_token_ids, trace_headers=self.trace_headers)
            async with aclosing(stream) as outputs:
                async for out in outputs:
                    if first_ns is None:
                        first_ns = time.monotonic_ns()
                    if deltas:
                        final = out.finished and not empty_final
                        yield self._respond(builder.delta(out), final)
                    elif out.finished:
                        yield self._respond(builder.whole(out), False if empty_final else
                                            (True if streaming else None))
                    if out.finished:
                        break
            if empty_final:
                yield self._respond(None, True)
            ok = True
        except ValueError as e:  # the engine rejected the request before admitting it
            raise InferError(grpc.StatusCode.INVALID_ARGUMENT,
                             f"{log_prefix(self.request.id)}{e}") from None
        except EngineOverloaded as e:
            raise InferError(grpc.StatusCode.RESOURCE_EXHAUSTED,
                             f"{log_prefix(self.request.id)}{e}") from None
        except RuntimeError as e:  # engine shut down, a failed step, or this request's failure
            raise InferError(grpc.StatusCode.INTERNAL, str(e), started=True) from None
        finally:
            # Everything at once, as Triton records a request when it is released.
            now = time.monotonic_ns()
            phases = None
            if first_ns is not None:
                phases = {"queue": first_ns - submitted, "compute_input": self._input_ns,
                          "compute_infer": now - first_ns, "compute_output": self._output_ns}
            self.model.stats.record(ok, now - self._t0, phases)
