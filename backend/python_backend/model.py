"""``TritonPythonModel``: our engine behind real Triton, decoupled, with the vLLM backend's tensors.

Triton calls ``execute`` on the stub's main thread with a batch of requests; each is parsed
there (a bad one is answered at once) and handed to an event loop on a thread of its own, where
one task per request drives ``AsyncEngine.generate`` and sends every response through the
request's response sender: text deltas when ``stream`` is set, else the whole completion, the
last response flagged FINAL. ``execute`` returns at once, so the engine batches requests from
any number of ``execute`` calls continuously.

A client that cancels (``is_cancelled()``, polled for every request in flight) has its task
cancelled, which aborts the engine request and frees its KV blocks; the request ends with a
CANCELLED error. Unloading (``finalize``) aborts whatever still runs and stops the engine.
Errors are ``TritonError``s with the codes our server's gRPC statuses map from: INVALID_ARG for
a bad request, UNAVAILABLE when the engine is full, INTERNAL for a failure while it ran.
"""

from __future__ import annotations

import asyncio
import json
import logging
import uuid
from concurrent.futures import Future
from contextlib import aclosing
from typing import Any

import numpy as np
import triton_python_backend_utils as pb_utils

from pagedserve.engine.async_engine import AsyncEngine, EngineOverloaded
from pagedserve.lora_request import LoRARequest
from pagedserve.protocol import model_config_pb2 as mc
from pagedserve.python_backend.loop import LoopThread
from pagedserve.python_backend.metrics import TritonEngineGauges
from pagedserve.python_backend.settings import engine_adapters, engine_settings
from pagedserve.repository.errors import RepositoryError
from pagedserve.repository.lora import UnknownLoRA, lora_request_for
from pagedserve.repository.manager import build_engine
from pagedserve.repository.model_config import VLLM_INPUTS, VLLM_OUTPUTS
from pagedserve.tensors import (
    GenerateRequest,
    ResponseBuilder,
    TensorError,
    parse_request,
    token_decoder,
)

log = logging.getLogger(__name__)

INPUT_NAMES = tuple(name for name, _, _, _ in VLLM_INPUTS)
# How often the requests in flight are asked whether their client cancelled them.
CANCEL_POLL_S = 0.2
_FINAL = pb_utils.TRITONSERVER_RESPONSE_COMPLETE_FINAL


def _error(message: str, code: int) -> Any:
    return pb_utils.InferenceResponse(error=pb_utils.TritonError(message, code))


class TritonPythonModel:
    """One model instance: one engine (weights and KV cache) serving every request."""

    @staticmethod
    def auto_complete_config(auto_complete_model_config: Any) -> Any:
        """Fills the vLLM backend's tensors a config leaves out and makes the model decoupled,
        as our server completes a config (``pagedserve.repository.model_config``)."""
        config = auto_complete_model_config.as_dict()
        have_inputs = {i["name"] for i in config.get("input", [])}
        for name, dtype, dims, optional in VLLM_INPUTS:
            if name not in have_inputs:
                auto_complete_model_config.add_input({
                    "name": name, "data_type": mc.DataType.Name(dtype), "dims": dims,
                    "optional": optional})
        have_outputs = {o["name"] for o in config.get("output", [])}
        for name, dtype, dims in VLLM_OUTPUTS:
            if name not in have_outputs:
                auto_complete_model_config.add_output({
                    "name": name, "data_type": mc.DataType.Name(dtype), "dims": dims})
        auto_complete_model_config.set_max_batch_size(0)
        auto_complete_model_config.set_model_transaction_policy({"decoupled": True})
        return auto_complete_model_config

    def initialize(self, args: dict[str, str]) -> None:
        config = json.loads(args["model_config"])
        if not pb_utils.using_decoupled_model_transaction_policy(config):
            raise pb_utils.TritonModelException(
                f"model '{args['model_name']}' must be decoupled "
                "(model_transaction_policy { decoupled: true }): it streams its responses")
        try:
            settings = engine_settings(args)
            self._loras = engine_adapters(args, settings)  # multi_lora.json, as our server's
        except RepositoryError as e:
            raise pb_utils.TritonModelException(e.message) from None
        gauges = TritonEngineGauges(pb_utils, args["model_name"], args["model_version"],
                                    args["model_instance_name"])
        engine, tokenizer = build_engine(settings, [gauges])
        self.engine: AsyncEngine = engine
        self._name = args["model_name"]
        self._decode = token_decoder(tokenizer)
        self._loop = LoopThread("pagedserve-requests")
        self._tasks: dict[asyncio.Task[None], Any] = {}  # task -> its response sender
        self._closing = False
        self._watcher = self._loop.submit(self._watch_cancellations())
        self._watcher.add_done_callback(self._watcher_ended)
        pb_utils.Logger.log_info(f"pagedserve: engine of '{self._name}' started")

    def execute(self, requests: list[Any]) -> None:
        for request in requests:
            sender = request.get_response_sender()
            try:
                generate = parse_request(self._inputs(request), self._parameters(request),
                                         frozenset(request.requested_output_names()),
                                         self.engine.limits)
                lora = lora_request_for(self._loras, generate.lora_name)
            except (TensorError, UnknownLoRA) as e:
                sender.send(_error(str(e), pb_utils.TritonError.INVALID_ARG), flags=_FINAL)
                continue
            self._loop.loop.call_soon_threadsafe(self._spawn, generate, lora, sender)
        return None

    def finalize(self) -> None:
        """Aborts the requests still running, then stops the engine (its threads, its cache)."""
        self._loop.submit(self._cancel_all()).result()
        self.engine.shutdown()
        self._loop.stop()
        pb_utils.Logger.log_info(f"pagedserve: engine of '{self._name}' released")

    # ---- the stub's main thread ------------------------------------------------------------

    @staticmethod
    def _inputs(request: Any) -> dict[str, np.ndarray]:
        arrays = {}
        for name in INPUT_NAMES:
            tensor = pb_utils.get_input_tensor_by_name(request, name)
            if tensor is not None:
                arrays[name] = tensor.as_numpy()
        return arrays

    @staticmethod
    def _parameters(request: Any) -> dict[str, Any]:
        values = json.loads(request.parameters() or "{}")
        return values if isinstance(values, dict) else {}

    # ---- the event loop's thread -----------------------------------------------------------

    def _spawn(self, generate: GenerateRequest, lora: LoRARequest | None, sender: Any) -> None:
        task = asyncio.get_running_loop().create_task(self._serve(generate, lora, sender))
        self._tasks[task] = sender
        task.add_done_callback(self._tasks.pop)

    async def _serve(self, generate: GenerateRequest, lora: LoRARequest | None,
                     sender: Any) -> None:
        builder = ResponseBuilder(generate, self._decode)
        try:
            stream = self.engine.generate(generate.prompt, generate.params,
                                          request_id=uuid.uuid4().hex,
                                          prompt_token_ids=generate.prompt_token_ids,
                                          lora_request=lora)
            async with aclosing(stream) as outputs:  # type: ignore[type-var]
                async for out in outputs:
                    if generate.stream:
                        self._send(sender, builder.delta(out), out.finished)
                    elif out.finished:
                        self._send(sender, builder.whole(out), True)
                    if out.finished:
                        return
        except asyncio.CancelledError:
            if not self._closing:  # the client cancelled; an unload has nobody to answer
                self._fail(sender, "Request was cancelled", pb_utils.TritonError.CANCELLED)
        except ValueError as e:  # the engine refused the request before admitting it
            self._fail(sender, str(e), pb_utils.TritonError.INVALID_ARG)
        except EngineOverloaded as e:
            self._fail(sender, str(e), pb_utils.TritonError.UNAVAILABLE)
        except RuntimeError as e:  # engine shut down, a failed step, or this request's failure
            self._fail(sender, str(e), pb_utils.TritonError.INTERNAL)
        except Exception as e:  # a bug must fail its request, never leave it unanswered
            log.exception("request failed")
            self._fail(sender, f"internal error: {e}", pb_utils.TritonError.INTERNAL)

    @staticmethod
    def _send(sender: Any, arrays: dict[str, np.ndarray], final: bool) -> None:
        tensors = [pb_utils.Tensor(name, array) for name, array in arrays.items()]
        sender.send(pb_utils.InferenceResponse(output_tensors=tensors),
                    flags=_FINAL if final else 0)

    @staticmethod
    def _fail(sender: Any, message: str, code: int) -> None:
        try:
            sender.send(_error(message, code), flags=_FINAL)
        except pb_utils.TritonModelException as e:  # the request is gone already
            log.debug("could not answer a request: %s", e)

    async def _watch_cancellations(self) -> None:
        while True:
            await asyncio.sleep(CANCEL_POLL_S)
            for task, sender in list(self._tasks.items()):
                if task.done():  # answered; Triton may have released its sender
                    continue
                try:
                    cancelled = sender.is_cancelled()
                except Exception:  # one request's failure must not blind the watch to the rest
                    log.exception("could not ask a request whether its client cancelled it")
                    continue
                if cancelled:
                    task.cancel()

    def _watcher_ended(self, watcher: Future[None]) -> None:
        # Without the watcher no cancellation is seen again: cancelled requests keep their blocks.
        if watcher.cancelled() or self._closing:
            return
        pb_utils.Logger.log_error(f"pagedserve: '{self._name}' no longer sees cancellations: "
                                  f"the watch ended ({watcher.exception()!r})")

    async def _cancel_all(self) -> None:
        self._closing = True
        self._watcher.cancel()
        tasks = list(self._tasks)
        for task in tasks:
            task.cancel()
        # Let the aborts reach the engine before it stops.
        await asyncio.gather(*tasks, return_exceptions=True)
