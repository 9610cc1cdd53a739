"""The OpenAI requests vLLM accepts, as pydantic models, and their sampling parameters.

Field names, defaults and checks follow vLLM's OpenAI server (unknown fields are ignored, as
there); what our engine does not offer (``logit_bias``, ``suffix``) is refused by name rather
than silently dropped. A request's constraint comes from ``response_format``, vLLM's
``structured_outputs`` field or its older ``guided_*`` fields, one of them at most.
"""

from __future__ import annotations

from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, model_validator

from pagedserve.sampling_params import SamplingParams
from pagedserve.server.http.openai.tools.plan import ToolError, ToolPlan, plan_tools
from pagedserve.structured_outputs import StructuredOutputsParams

# vLLM's older fields, each one constraint of StructuredOutputsParams.
_GUIDED = {"guided_json": "json", "guided_regex": "regex", "guided_choice": "choice",
           "guided_grammar": "grammar"}


class OpenAIRequestError(Exception):
    """A request the OpenAI door refuses (400), naming the field in ``param`` (not a
    ``ValueError``, so that pydantic passes it on as it is)."""

    def __init__(self, message: str, param: str | None = None) -> None:
        super().__init__(message)
        self.message = message
        self.param = param


class _Request(BaseModel):
    model_config = ConfigDict(extra="allow")  # unknown fields are ignored, as vLLM does


class StreamOptions(_Request):
    include_usage: bool = False
    continuous_usage_stats: bool = False


class _Sampling(_Request):
    """What completions and chat share."""

    model: str | None = None
    frequency_penalty: float | None = None
    presence_penalty: float | None = None
    logit_bias: dict[str, float] | None = None
    n: int = 1
    seed: int | None = None
    stop: str | list[str] | None = None
    stream: bool | None = False
    stream_options: StreamOptions | None = None
    temperature: float | None = None
    top_p: float | None = None
    user: str | None = None
    # vLLM's extra fields
    best_of: int | None = None
    use_beam_search: bool = False
    length_penalty: float = 1.0
    top_k: int | None = None
    min_p: float | None = None
    repetition_penalty: float | None = None
    stop_token_ids: list[int] | None = None
    include_stop_str_in_output: bool = False
    ignore_eos: bool = False
    min_tokens: int = 0
    skip_special_tokens: bool = True
    prompt_logprobs: int | None = None
    response_format: dict[str, Any] | None = None
    structured_outputs: dict[str, Any] | None = None
    guided_json: str | dict[str, Any] | None = None
    guided_regex: str | None = None
    guided_choice: list[str] | None = None
    guided_grammar: str | None = None

    @model_validator(mode="after")
    def _check(self) -> _Sampling:
        if self.stream_options is not None and not self.stream:
            raise OpenAIRequestError("Stream options can only be defined when `stream=True`.",
                                     "stream_options")
        if self.logit_bias:
            raise OpenAIRequestError("logit_bias is not supported", "logit_bias")
        if self.prompt_logprobs is not None:
            if self.prompt_logprobs < 0:
                raise OpenAIRequestError("`prompt_logprobs` must be a positive value or -1.",
                                         "prompt_logprobs")
            if self.stream:
                raise OpenAIRequestError("`prompt_logprobs` are not available when "
                                         "`stream=True`.", "prompt_logprobs")
        if self.use_beam_search and self.stream:
            raise OpenAIRequestError("Streaming is not currently supported with beam search",
                                     "stream")
        if self.best_of is not None:
            if self.best_of < self.n:
                raise OpenAIRequestError(f"best_of must be greater than or equal to n, got "
                                         f"n={self.n} and best_of={self.best_of}.", "best_of")
            if self.stream and self.best_of != self.n:
                raise OpenAIRequestError("best_of must equal n when streaming: the best "
                                         "sequences are known only at the end", "best_of")
        return self

    def constraint(self) -> StructuredOutputsParams | None:
        """The request's structured-outputs constraint, from whichever field gave it."""
        given = [name for name in ("response_format", "structured_outputs", *_GUIDED)
                 if getattr(self, name) is not None]
        forced = self.forced_constraint()
        if forced is not None:
            given.insert(0, "tool_choice")
        if self.response_format is not None and self.response_format.get("type") == "text":
            given.remove("response_format")
        if len(given) > 1:
            raise OpenAIRequestError(f"only one of {', '.join(given)} may constrain the "
                                     "output", given[1])
        if not given:
            return None
        name = given[0]
        if forced is not None:
            return forced
        try:
            if name == "response_format":
                return _response_format(self.response_format or {})
            if name == "structured_outputs":
                return StructuredOutputsParams.from_value(self.structured_outputs)
            return StructuredOutputsParams(**{_GUIDED[name]: getattr(self, name)}, source=name)
        except ValueError as e:
            raise OpenAIRequestError(str(e), name) from None

    def forced_constraint(self) -> StructuredOutputsParams | None:
        """A constraint the request's other fields force (the chat's tool choice)."""
        return None

    def sampling_params(self, max_tokens: int | None, logprobs: int | None,
                        prompt_logprobs: int | None) -> SamplingParams:
        """The engine's parameters; ``ValueError`` (naming the field) where they are bad."""
        stop = [self.stop] if isinstance(self.stop, str) else list(self.stop or [])
        values: dict[str, Any] = {
            "n": self.n, "seed": self.seed, "stop": stop, "max_tokens": max_tokens,
            "min_tokens": self.min_tokens, "stop_token_ids": list(self.stop_token_ids or []),
            "include_stop_str_in_output": self.include_stop_str_in_output,
            "ignore_eos": self.ignore_eos, "logprobs": logprobs,
            "prompt_logprobs": prompt_logprobs,
            "skip_special_tokens": self.skip_special_tokens,
            "structured_outputs": self.constraint()}
        optional = {"temperature": self.temperature, "top_p": self.top_p, "top_k": self.top_k,
                    "min_p": self.min_p, "repetition_penalty": self.repetition_penalty,
                    "presence_penalty": self.presence_penalty,
                    "frequency_penalty": self.frequency_penalty}
        values.update({k: v for k, v in optional.items() if v is not None})
        if self.best_of is not None and self.best_of > self.n:
            values["n"] = self.best_of  # the best n of best_of are returned
        if self.use_beam_search:
            values = {k: v for k, v in values.items()
                      if k in ("n", "max_tokens", "min_tokens", "stop_token_ids", "ignore_eos",
                               "skip_special_tokens", "prompt_logprobs",
                               "structured_outputs")}
            values["beam_width"] = max(self.best_of or self.n, self.n, 2)
            values["n"] = self.n
            values["length_penalty"] = self.length_penalty
        return SamplingParams.from_dict(values)


class CompletionRequest(_Sampling):
    prompt: str | list[str] | list[int] | list[list[int]] | None = None
    echo: bool | None = False
    logprobs: int | None = None
    max_tokens: int | None = 16
    suffix: str | None = None

    @model_validator(mode="after")
    def _check_completion(self) -> CompletionRequest:
        if self.prompt is None or self.prompt == "" or self.prompt == []:
            raise OpenAIRequestError("Either prompt or prompt_embeds must be provided and "
                                     "non-empty.", "prompt")
        if self.suffix is not None:
            raise OpenAIRequestError("suffix is only supported for models with FIM completion "
                                     "rendering", "suffix")
        if self.logprobs is not None and self.logprobs < 0:
            raise OpenAIRequestError("`logprobs` must be a positive value or -1.", "logprobs")
        if self.use_beam_search and self.echo and self.logprobs is not None:
            raise OpenAIRequestError("`echo` with `logprobs` is not supported with beam search "
                                     "because beam search does not compute prompt logprobs.",
                                     "echo")
        if self.max_tokens is not None and self.max_tokens == 0 and not self.echo:
            raise OpenAIRequestError("max_tokens must be at least 1, got 0.", "max_tokens")
        return self

    def prompts(self) -> list[str | list[int]]:
        """Each prompt: a string or a list of token ids."""
        prompt = self.prompt
        if isinstance(prompt, str):
            return [prompt]
        assert prompt is not None
        if all(isinstance(p, int) for p in prompt):
            return [list(prompt)]  # type: ignore[arg-type]
        return list(prompt)  # type: ignore[arg-type]

    def to_sampling_params(self) -> SamplingParams:
        # echo with max_tokens=0 scores the prompt: the engine generates one token, which is not
        # returned (vLLM's rule).
        max_tokens = 16 if self.max_tokens is None else max(self.max_tokens, 1)
        prompt_logprobs = self.prompt_logprobs
        if self.echo and prompt_logprobs is None and self.logprobs is not None:
            prompt_logprobs = self.logprobs
        return self.sampling_params(max_tokens, self.logprobs, prompt_logprobs)


class TextPart(BaseModel):
    type: Literal["text"]
    text: str


class ChatMessage(_Request):
    role: str
    content: str | list[dict[str, Any]] | None = None
    name: str | None = None
    tool_calls: list[dict[str, Any]] | None = None  # an assistant's earlier calls
    tool_call_id: str | None = None  # a tool result's call

    def text(self) -> str | None:
        """The content as one string: text parts joined by newlines, as vLLM renders them for
        templates that take a string."""
        if self.content is None or isinstance(self.content, str):
            return self.content
        parts = []
        for part in self.content:
            if part.get("type") != "text" or not isinstance(part.get("text"), str):
                raise OpenAIRequestError(f"message content part of type "
                                         f"{str(part.get('type'))[:40]!r} is not supported: "
                                         "only text", "messages")
            parts.append(part["text"])
        return "\n".join(parts)


class ChatCompletionRequest(_Sampling):
    messages: list[ChatMessage] = Field(min_length=1)
    logprobs: bool = False
    top_logprobs: int | None = 0
    max_tokens: int | None = None
    max_completion_tokens: int | None = None
    add_generation_prompt: bool = True
    continue_final_message: bool = False
    chat_template_kwargs: dict[str, Any] | None = None
    echo: bool = False
    tools: list[dict[str, Any]] | None = None
    tool_choice: Any = None

    @model_validator(mode="after")
    def _check_chat(self) -> ChatCompletionRequest:
        if self.top_logprobs and not self.logprobs:
            raise OpenAIRequestError("when using `top_logprobs`, `logprobs` must be set to true.",
                                     "top_logprobs")
        if self.top_logprobs is not None and self.top_logprobs < 0:
            raise OpenAIRequestError("`top_logprobs` must be a positive value or -1.",
                                     "top_logprobs")
        if self.add_generation_prompt and self.continue_final_message and \
                "add_generation_prompt" in self.model_fields_set:
            raise OpenAIRequestError("Cannot set both `continue_final_message` and "
                                     "`add_generation_prompt` to True.", "continue_final_message")
        self.tool_plan()  # refused here, by name, if bad
        return self

    def tool_plan(self) -> ToolPlan:
        try:
            return plan_tools(self.tools, self.tool_choice)
        except ToolError as e:
            raise OpenAIRequestError(str(e), e.param) from None

    def forced_constraint(self) -> StructuredOutputsParams | None:
        try:
            return self.tool_plan().constraint()
        except ValueError as e:  # a tool's parameters are no JSON schema object
            raise OpenAIRequestError(str(e), "tools") from None

    def conversation(self) -> list[dict[str, Any]]:
        messages = []
        for m in self.messages:
            message: dict[str, Any] = {"role": m.role, "content": m.text()}
            for key in ("name", "tool_calls", "tool_call_id"):
                if getattr(m, key) is not None:
                    message[key] = getattr(m, key)
            messages.append(message)
        return messages

    def to_sampling_params(self) -> SamplingParams:
        max_tokens = (self.max_completion_tokens if self.max_completion_tokens is not None
                      else self.max_tokens)
        logprobs = (self.top_logprobs or 0) if self.logprobs else None
        return self.sampling_params(max_tokens, logprobs, self.prompt_logprobs)


def _response_format(value: dict[str, Any]) -> StructuredOutputsParams:
    """OpenAI's ``response_format``: ``json_object``, or ``json_schema`` with its ``schema``
    (``strict`` or not, the schema is enforced: vLLM's rule)."""
    kind = value.get("type")
    if kind == "json_object":
        return StructuredOutputsParams(json_object=True, source="response_format")
    if kind == "json_schema":
        spec = value.get("json_schema")
        if not isinstance(spec, dict):
            raise ValueError("response_format.json_schema must be an object with the schema")
        schema = spec.get("schema", spec.get("json_schema"))
        if schema is None:
            raise ValueError("response_format.json_schema.schema is required")
        return StructuredOutputsParams(json=schema, source="response_format")
    raise ValueError(f"response_format.type must be text, json_object or json_schema, got "
                     f"{str(kind)[:40]!r}")
