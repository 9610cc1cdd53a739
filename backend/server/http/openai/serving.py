"""The OpenAI-compatible routes: ``GET /v1/models``, ``POST /v1/completions`` and
``POST /v1/chat/completions``, whole or streamed (Server-Sent Events ending ``data: [DONE]``).

Each prompt of a request is one engine request on the model the request names (a ready model
of the repository; the first one when it names none), or on the LoRA adapter it names (the
model that serves the adapter runs it; responses name the adapter, as vLLM's do). A client
that disconnects cancels its handler, which aborts its engine requests at once. Errors are
OpenAI's error object with the status vLLM answers; once a stream has started, an error is an
``error`` event followed by ``[DONE]``. Every request is counted in Triton's statistics as a
gRPC one is, and the engine's own metrics and spans come from the engine, whichever door fed
it.
"""

from __future__ import annotations

import asyncio
import time
import uuid
from collections.abc import AsyncIterator, Callable, Iterable
from contextlib import aclosing
from dataclasses import dataclass
from typing import Any, TypeVar

import pydantic
from aiohttp import web

from pagedserve.engine.async_engine import EngineDead, EngineOverloaded, EngineStopped
from pagedserve.lora_request import LoRARequest
from pagedserve.outputs import CompletionOutput, RequestOutput, TokenLogprobs
from pagedserve.repository import ModelVersion, RepositoryError
from pagedserve.sampling_params import SamplingParams
from pagedserve.server.accounting import RequestAccount
from pagedserve.server.http.context import HttpContext, trace_headers
from pagedserve.server.http.errors import compact
from pagedserve.server.http.openai import responses
from pagedserve.server.http.openai.protocol import (
    ChatCompletionRequest,
    CompletionRequest,
    OpenAIRequestError,
)
from pagedserve.server.http.openai.tools.answer import ChoiceStream, whole
from pagedserve.server.http.openai.tools.parsers import ToolParser, parser_for_template
from pagedserve.server.http.openai.tools.plan import ToolPlan
from pagedserve.server.http.openai.tools.prompt import conversation_with_tools, renders_tools
from pagedserve.server.streaming import SHUTTING_DOWN
from pagedserve.tensors import token_decoder

_Request = TypeVar("_Request", CompletionRequest, ChatCompletionRequest)
SSE_HEADERS = {"Content-Type": "text/event-stream; charset=utf-8", "Cache-Control": "no-cache"}
_DONE = b"data: [DONE]\n\n"
_TYPES = {400: "BadRequestError", 404: "NotFoundError", 500: "InternalServerError",
          503: "ServiceUnavailableError"}
MAX_REQUEST_ID_CHARS = 256


class OpenAIError(Exception):
    """A failed request: OpenAI's error object with ``status``."""

    def __init__(self, status: int, message: str, param: str | None = None,
                 kind: str | None = None) -> None:
        super().__init__(message)
        self.status, self.message, self.param = status, message, param
        self.kind = kind or _TYPES.get(status, "Error")  # the error object's ``type``

    def body(self) -> dict[str, Any]:
        return {"error": {"message": self.message, "type": self.kind,
                          "param": self.param, "code": self.status}}

    def response(self) -> web.Response:
        return web.Response(body=compact(self.body()), status=self.status,
                            content_type="application/json")


def _event(value: dict[str, Any]) -> bytes:
    return b"data: " + compact(value) + b"\n\n"


def _engine_error(e: BaseException) -> OpenAIError:
    # Overloaded, unloaded while it ran, or its engine dead: the service, not the request.
    if isinstance(e, EngineOverloaded | EngineStopped | EngineDead):
        return OpenAIError(503, str(e))
    if isinstance(e, ValueError):
        return OpenAIError(400, str(e))
    return OpenAIError(500, str(e) or type(e).__name__)


@dataclass(frozen=True)
class _Call:
    """What answering one OpenAI request needs."""

    model: ModelVersion
    params: SamplingParams
    request_id: str
    created: int
    headers: dict[str, str] | None
    decode: Callable[[int], str]
    lora: LoRARequest | None = None  # the adapter the request named
    name: str = ""  # what responses call the model: the name the request used

    @property
    def served(self) -> str:
        return self.name or self.model.name


@dataclass
class _Prompt:
    """One prompt of a request, and what it became."""

    index: int
    text: str | None
    token_ids: list[int] | None
    output: RequestOutput | None = None


def _card(name: str, created: int, root: str, parent: str | None,
          max_model_len: int | None) -> dict[str, Any]:
    """A ``/v1/models`` entry, as vLLM's ``ModelCard``."""
    return {"id": name, "object": "model", "created": created, "owned_by": "pagedserve",
            "root": root, "parent": parent, "max_model_len": max_model_len,
            "permission": [{"id": f"modelperm-{uuid.uuid4().hex}", "object": "model_permission",
                            "created": created, "allow_create_engine": False,
                            "allow_sampling": True, "allow_logprobs": True,
                            "allow_search_indices": False, "allow_view": True,
                            "allow_fine_tuning": False, "organization": "*", "group": None,
                            "is_blocking": False}]}


class OpenAIRoutes:
    def __init__(self, context: HttpContext) -> None:
        self.context = context

    def routes(self) -> Iterable[tuple[str, str, Callable[..., Any]]]:
        yield "GET", "/v1/models", self.models
        yield "POST", "/v1/completions", self.completions
        yield "POST", "/v1/chat/completions", self.chat

    # ---- helpers ---------------------------------------------------------------------------

    def _model(self, name: str | None) -> tuple[ModelVersion, LoRARequest | None]:
        """The model version a request's ``model`` names, and the LoRA adapter when it names
        one (adapter names never equal a model's)."""
        repository = self.context.repository
        if name is None:
            ready = sorted(repository.all_ready(), key=lambda m: (m.name, -m.version))
            if not ready:
                raise OpenAIError(404, "no model is ready")
            return ready[0], None
        try:
            return repository.get(name, ""), None
        except RepositoryError:
            found = repository.adapter(name)
            if found is not None:
                return found
            raise OpenAIError(404, f"The model `{name[:200]}` does not exist.",
                              "model") from None

    async def _parse(self, request: web.Request, kind: type[_Request]) -> _Request:
        if self.context.state.draining:
            raise OpenAIError(503, SHUTTING_DOWN)
        body = await request.read()
        try:
            return kind.model_validate_json(body)
        except OpenAIRequestError as e:
            raise OpenAIError(400, e.message, e.param) from None
        except pydantic.ValidationError as e:
            first = e.errors(include_url=False)[0]
            param = ".".join(str(p) for p in first["loc"]) or None
            raise OpenAIError(400, f"{e.error_count()} validation error(s): {param}: "
                                   f"{first['msg']}", param) from None

    async def _begin(self, request: web.Request, kind: type[_Request], prefix: str
                     ) -> tuple[_Request, _Call]:
        """The request, checked, and what answering it needs."""
        body = await self._parse(request, kind)
        model, lora = self._model(body.model)
        try:
            params = body.to_sampling_params()
        except OpenAIRequestError as e:
            raise OpenAIError(400, e.message, e.param) from None
        except (ValueError, TypeError) as e:
            raise OpenAIError(400, str(e)) from None
        given = request.headers.get("X-Request-Id", "")
        request_id = prefix + (given if 0 < len(given) <= MAX_REQUEST_ID_CHARS
                               else uuid.uuid4().hex)
        return body, _Call(model, params, request_id, int(time.time()),
                           trace_headers(request.headers), token_decoder(model.tokenizer),
                           lora, lora.lora_name if lora is not None else model.name)

    @staticmethod
    async def _sse(request: web.Request, events: AsyncIterator[bytes]) -> web.StreamResponse:
        """Streams ``events``, then ``[DONE]``. An error before the first event is an error
        response; one after it, an ``error`` event."""
        stream = web.StreamResponse(headers=SSE_HEADERS)
        try:
            async for event in events:
                if not stream.prepared:
                    await stream.prepare(request)
                await stream.write(event)
        except OpenAIError as e:
            if not stream.prepared:
                raise
            await stream.write(_event(e.body()))
        if not stream.prepared:
            await stream.prepare(request)
        await stream.write(_DONE)
        await stream.write_eof()
        return stream

    async def _run(self, call: _Call, prompt: _Prompt) -> AsyncIterator[RequestOutput]:
        """The engine's outputs for one prompt, counted in Triton's statistics."""
        model = call.model
        account = RequestAccount(model.stats)
        account.submitted()
        ok = False
        try:
            stream = model.engine.generate(prompt.text, call.params, request_id=uuid.uuid4().hex,
                                           prompt_token_ids=prompt.token_ids,
                                           trace_headers=call.headers, lora_request=call.lora)
            async with aclosing(stream) as outputs:  # type: ignore[type-var]
                async for out in outputs:
                    account.output()
                    yield out
            ok = True
        except (ValueError, EngineOverloaded, RuntimeError) as e:
            error = _engine_error(e)
            constraint = call.params.structured_outputs
            if (isinstance(e, ValueError) and constraint is not None
                    and str(e).startswith(constraint.source)):
                # The constraint was refused when compiled: the field it came from.
                error.param = constraint.source
            raise error from None
        finally:
            account.release(ok)

    async def _final(self, call: _Call, prompt: _Prompt) -> _Prompt:
        async for out in self._run(call, prompt):
            prompt.output = out
        return prompt

    async def _merged(self, call: _Call, prompts: list[_Prompt]
                      ) -> AsyncIterator[tuple[_Prompt, RequestOutput]]:
        """Every prompt's outputs as they come, all prompts running at once."""
        queue: asyncio.Queue[tuple[_Prompt, RequestOutput] | BaseException | None] = \
            asyncio.Queue()

        async def feed(prompt: _Prompt) -> None:
            try:
                async for out in self._run(call, prompt):
                    prompt.output = out
                    queue.put_nowait((prompt, out))
                queue.put_nowait(None)
            except BaseException as e:  # handed to the consumer, which re-raises it
                queue.put_nowait(e)

        tasks = [asyncio.create_task(feed(p)) for p in prompts]
        try:
            running = len(tasks)
            while running:
                item = await queue.get()
                if item is None:
                    running -= 1
                elif isinstance(item, BaseException):
                    raise item
                else:
                    yield item
        finally:
            for task in tasks:
                task.cancel()
            await asyncio.gather(*tasks, return_exceptions=True)

    async def _respond(self, request: web.Request, handler: Callable[..., Any]
                       ) -> web.StreamResponse:
        """Runs ``handler``; errors before a stream started become error responses."""
        try:
            result: web.StreamResponse = await handler()
            return result
        except OpenAIError as e:
            return e.response()

    @staticmethod
    def _best(out: RequestOutput, n: int) -> list[CompletionOutput]:
        """The ``n`` sequences returned: all of them, or the best of ``best_of``."""
        if len(out.outputs) <= n:
            return out.outputs
        ranked = sorted(out.outputs, key=lambda s: -(s.cumulative_logprob or 0.0))
        return sorted(ranked[:n], key=lambda s: s.index)

    @staticmethod
    def _cached(outputs: Iterable[RequestOutput | None]) -> int:
        return sum(o.num_cached_tokens for o in outputs if o is not None)

    # ---- /v1/models ------------------------------------------------------------------------

    async def models(self, request: web.Request) -> web.Response:
        """The ready models, then each LoRA adapter of theirs as a card of its own whose
        ``parent`` is its model (vLLM's shape; ``root`` is the adapter's name: no server path
        goes out)."""
        created = int(time.time())
        cards: dict[str, dict[str, Any]] = {}
        adapters: dict[str, dict[str, Any]] = {}
        for model in sorted(self.context.repository.all_ready(),
                            key=lambda m: (m.name, -m.version)):
            if model.name not in cards:
                cards[model.name] = _card(model.name, created, model.name, None,
                                          model.engine.core.limits.max_model_len)
            for name in model.loras.names() if model.loras is not None else ():
                adapters.setdefault(name, _card(name, created, name, model.name, None))
        return web.Response(body=compact({"object": "list",
                                          "data": [*cards.values(), *adapters.values()]}),
                            content_type="application/json")

    # ---- /v1/completions -------------------------------------------------------------------

    async def completions(self, request: web.Request) -> web.StreamResponse:
        return await self._respond(request, lambda: self._completions(request))

    async def _completions(self, request: web.Request) -> web.StreamResponse:
        body, call = await self._begin(request, CompletionRequest, "cmpl-")
        model = call.model
        prompts = [_Prompt(i, p if isinstance(p, str) else None,
                           None if isinstance(p, str) else p)
                   for i, p in enumerate(body.prompts())]
        if body.stream:
            return await self._sse(request, self._completion_events(body, call, prompts))
        done = await asyncio.gather(*(self._final(call, p) for p in prompts))
        choices = []
        completion_tokens = 0
        for prompt in done:
            out = prompt.output
            assert out is not None
            for i, seq in enumerate(self._best(out, body.n)):
                text, logprobs, tokens = self._completion_text(body, model, out, seq,
                                                               call.decode)
                completion_tokens += tokens
                choices.append(responses.completion_choice(
                    prompt.index * body.n + i, text, logprobs, seq.finish_reason,
                    seq.stop_reason))
        outs = [p.output for p in done]
        usage = responses.usage(sum(len(o.prompt_token_ids) for o in outs if o),
                                completion_tokens, self._cached(outs))
        return web.Response(body=compact(responses.envelope(
            call.request_id, "text_completion", call.created, call.served, choices, usage)),
            content_type="application/json")

    @staticmethod
    def _prompt_text(model: ModelVersion, out: RequestOutput) -> str:
        if out.prompt is not None:
            return out.prompt
        return str(model.tokenizer.decode(out.prompt_token_ids))

    def _completion_text(self, body: CompletionRequest, model: ModelVersion,
                         out: RequestOutput, seq: CompletionOutput, decode: Any
                         ) -> tuple[str, dict[str, Any] | None, int]:
        """A whole choice: its text, logprobs and number of generated tokens returned."""
        scoring = body.echo and body.max_tokens == 0  # the prompt alone, scored
        token_ids: list[int] = [] if scoring else list(seq.token_ids)
        positions: list[TokenLogprobs | None] = [] if scoring else list(seq.logprobs or [])
        text = "" if scoring else seq.text
        if body.echo:
            text = self._prompt_text(model, out) + text
            token_ids = list(out.prompt_token_ids) + token_ids
            positions = list(out.prompt_logprobs or [None] * len(out.prompt_token_ids)) + \
                positions
        logprobs = None
        if body.logprobs is not None:
            logprobs = responses.completion_logprobs(token_ids, positions, body.logprobs,
                                                     decode)
        return text, logprobs, 0 if scoring else len(seq.token_ids)

    async def _completion_events(self, body: CompletionRequest, call: _Call,
                                 prompts: list[_Prompt]) -> AsyncIterator[bytes]:
        model = call.model
        offsets: dict[int, int] = {}
        generated: dict[int, int] = {}
        options = body.stream_options
        async for prompt, out in self._merged(call, prompts):
            for seq, delta, delta_ids in zip(out.outputs, out.delta_texts, out.delta_token_ids):
                index = prompt.index * body.n + seq.index
                first = index not in offsets
                if not delta_ids and not delta and not seq.finished and not first:
                    continue
                text, ids = delta, list(delta_ids)
                positions: list[TokenLogprobs | None] = (
                    list(seq.logprobs[len(seq.logprobs) - len(delta_ids):])
                    if seq.logprobs is not None and delta_ids else [None] * len(ids))
                if first and body.echo:
                    text = self._prompt_text(model, out) + text
                    ids = list(out.prompt_token_ids) + ids
                    prompt_positions: list[TokenLogprobs | None] = [
                        None] * len(out.prompt_token_ids)
                    positions = prompt_positions + positions
                generated[index] = generated.get(index, 0) + len(delta_ids)
                logprobs = None
                offset = offsets.get(index, 0)
                if body.logprobs is not None:
                    logprobs = responses.completion_logprobs(ids, positions, body.logprobs,
                                                             call.decode, offset)
                    if ids:
                        offset = logprobs["text_offset"][-1] + len(logprobs["tokens"][-1])
                offsets[index] = offset
                chunk = responses.envelope(call.request_id, "text_completion", call.created,
                                           call.served, [responses.completion_choice(
                                               index, text, logprobs, seq.finish_reason,
                                               seq.stop_reason)])
                if options is not None and options.continuous_usage_stats:
                    chunk["usage"] = responses.usage(len(out.prompt_token_ids),
                                                     generated[index], None)
                yield _event(chunk)
        if options is not None and options.include_usage:
            outs = [p.output for p in prompts]
            yield _event(responses.envelope(
                call.request_id, "text_completion", call.created, call.served, [],
                responses.usage(sum(len(o.prompt_token_ids) for o in outs if o),
                                sum(generated.values()), self._cached(outs))))

    # ---- /v1/chat/completions --------------------------------------------------------------

    async def chat(self, request: web.Request) -> web.StreamResponse:
        return await self._respond(request, lambda: self._chat(request))

    async def _chat(self, request: web.Request) -> web.StreamResponse:
        body, call = await self._begin(request, ChatCompletionRequest, "chatcmpl-")
        model = call.model
        plan = body.tool_plan()
        template = model.tokenizer.chat_template
        parser = parser_for_template(template)
        try:
            messages = body.conversation()
            extra: dict[str, Any] = {}
            if not renders_tools(template):
                messages = conversation_with_tools(messages, plan)
            elif plan.offered:
                extra["tools"] = [t.spec for t in plan.tools]
            text = model.tokenizer.apply_chat_template(
                messages, tokenize=False,
                add_generation_prompt=body.add_generation_prompt and not
                body.continue_final_message,
                continue_final_message=body.continue_final_message,
                **extra, **(body.chat_template_kwargs or {}))
        except OpenAIRequestError as e:
            raise OpenAIError(400, e.message, e.param) from None
        except Exception as e:  # the template's own error, about this conversation
            raise OpenAIError(400, f"chat template: {e}", "messages") from None
        prompt = _Prompt(0, str(text), None)
        top = (body.top_logprobs or 0) if body.logprobs else None
        echo = ""
        if body.echo and body.messages[-1].role == "assistant":
            echo = body.messages[-1].text() or ""
        if body.stream:
            return await self._sse(request, self._chat_events(body, call, prompt, top, echo,
                                                              plan, parser))
        await self._final(call, prompt)
        out = prompt.output
        assert out is not None
        choices = []
        completion_tokens = 0
        for i, seq in enumerate(self._best(out, body.n)):
            completion_tokens += len(seq.token_ids)
            logprobs = None
            if top is not None:
                logprobs = responses.chat_logprobs(seq.token_ids, seq.logprobs or [], top,
                                                   call.decode)
            answer = whole(echo + seq.text, seq.finish_reason, plan, parser)
            choices.append(responses.chat_choice(i, answer.message(), logprobs,
                                                 answer.finish_reason, seq.stop_reason))
        usage = responses.usage(len(out.prompt_token_ids), completion_tokens,
                                out.num_cached_tokens)
        return web.Response(body=compact(responses.envelope(
            call.request_id, "chat.completion", call.created, call.served, choices, usage)),
            content_type="application/json")

    async def _chat_events(self, body: ChatCompletionRequest, call: _Call, prompt: _Prompt,
                           top: int | None, echo: str, plan: ToolPlan, parser: ToolParser
                           ) -> AsyncIterator[bytes]:
        generated: dict[int, int] = {}
        streams: dict[int, ChoiceStream] = {}
        options = body.stream_options
        prompt_tokens = 0

        def chunk(choice: dict[str, Any], tokens: int) -> bytes:
            value = responses.envelope(call.request_id, "chat.completion.chunk", call.created,
                                       call.served, [choice])
            if options is not None and options.continuous_usage_stats:
                value["usage"] = responses.usage(prompt_tokens, tokens, None)
            return _event(value)

        async for _, out in self._merged(call, [prompt]):
            prompt_tokens = len(out.prompt_token_ids)
            for seq, delta, delta_ids in zip(out.outputs, out.delta_texts, out.delta_token_ids):
                index = seq.index
                if index not in generated:
                    generated[index] = 0
                    streams[index] = ChoiceStream(plan, parser)
                    yield chunk(responses.chat_delta(
                        index, {"role": "assistant", "content": ""}, None, None), 0)
                    if echo:
                        yield chunk(responses.chat_delta(index, {"content": echo}, None, None),
                                    0)
                if not delta and not delta_ids and not seq.finished:
                    continue
                generated[index] += len(delta_ids)
                logprobs = None
                if top is not None and delta_ids and seq.logprobs is not None:
                    logprobs = responses.chat_logprobs(
                        delta_ids, seq.logprobs[len(seq.logprobs) - len(delta_ids):], top,
                        call.decode)
                stream = streams[index]
                # Text held back as a possible tool call goes out later; its logprobs with
                # the step's chunk, if it has one.
                deltas = stream.feed(delta, seq.finished) or (
                    [{"content": ""}] if seq.finished or logprobs else [])
                for i, part in enumerate(deltas):
                    last = i == len(deltas) - 1
                    yield chunk(responses.chat_delta(
                        index, part, logprobs if last else None,
                        stream.finish_reason(seq.finish_reason) if last else None,
                        seq.stop_reason), generated[index])
        if options is not None and options.include_usage:
            final = prompt.output
            assert final is not None
            yield _event(responses.envelope(
                call.request_id, "chat.completion.chunk", call.created, call.served, [],
                responses.usage(len(final.prompt_token_ids), sum(generated.values()),
                                final.num_cached_tokens)))
