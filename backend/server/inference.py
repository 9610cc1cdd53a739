"""One inference request through the engine: decode, generate, encode, account.

Shared by unary ``ModelInfer`` and streaming ``ModelStreamInfer``. A request either fails before
the engine admits it (bad tensors, bad sampling parameters, a prompt the engine rejects) or runs
to completion; cancelling the task that drives ``responses`` aborts it in the engine at once.
"""

from __future__ import annotations

import uuid
from collections.abc import AsyncGenerator, Mapping
from contextlib import aclosing
from typing import Any

import grpc

from pagedserve.engine.async_engine import EngineOverloaded, EngineStopped
from pagedserve.lora_request import LoRARequest
from pagedserve.outputs import RequestOutput
from pagedserve.protocol import grpc_service_pb2 as pb
from pagedserve.repository import ModelVersion
from pagedserve.repository.lora import UnknownLoRA, lora_request_for
from pagedserve.server.accounting import RequestAccount
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
        self._account = RequestAccount(model.stats)
        self.lora: LoRARequest | None = None  # the adapter it names, once prepared

    def prepare(self) -> tuple[GenerateRequest, bool]:
        """Validates the request; returns it and whether an empty final response was asked."""
        try:
            check_request_id(self.request)
            empty_final = enable_empty_final(self.request)
            arrays = read_inputs(self.request, self.model.config)
            requested = frozenset(o.name for o in self.request.outputs)
            generate = parse_request(arrays, request_parameters(self.request), requested,
                                     self.model.engine.limits)
            self.lora = lora_request_for(self.model.loras, generate.lora_name)
        except (TensorError, UnknownLoRA) as e:
            self._account.release(False)
            raise InferError(grpc.StatusCode.INVALID_ARGUMENT, str(e)) from None
        return generate, empty_final

    def _respond(self, arrays: Any, final: bool | None) -> pb.ModelInferResponse:
        with self._account.building():
            return build_response(self.request, self.version, self.model.config, arrays, final)

    async def responses(self, generate: GenerateRequest, streaming: bool, empty_final: bool
                        ) -> AsyncGenerator[pb.ModelInferResponse, None]:
        """Yields the responses: deltas when ``streaming`` and the request streams, else one.

        ``triton_final_response`` is set on every response of a stream; with ``empty_final`` the
        last data response is not final and an output-less final response follows.
        """
        builder = ResponseBuilder(generate, token_decoder(self.model.tokenizer))
        deltas = streaming and generate.stream and self.model.decoupled
        self._account.submitted()
        engine_id = uuid.uuid4().hex  # client ids repeat across streams; the engine's must not
        ok = False
        try:
            stream: AsyncGenerator[RequestOutput, None] = self.model.engine.generate(  # type: ignore[assignment]
                generate.prompt, generate.params, request_id=engine_id,
                prompt_token_ids=generate.prompt_token_ids, trace_headers=self.trace_headers,
                lora_request=self.lora)
            async with aclosing(stream) as outputs:
                async for out in outputs:
                    self._account.output()
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
        except EngineStopped as e:  # its model unloaded: another replica or a reload serves it
            raise InferError(grpc.StatusCode.UNAVAILABLE, str(e), started=True) from None
        except RuntimeError as e:  # engine shut down, a failed step, or this request's failure
            raise InferError(grpc.StatusCode.INTERNAL, str(e), started=True) from None
        finally:
            self._account.release(ok)
