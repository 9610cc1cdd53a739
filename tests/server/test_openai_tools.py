"""Tool calling through the official ``openai`` client against a real server.

A named ``tool_choice`` and ``required`` give arguments that validate against the tools'
schemas, whole and streamed; ``auto`` returns ``tool_calls`` when the model writes a call (two
earlier calls in the conversation lead the embedded model to), and content when it does not;
bad tools and choices are 400s naming the field.
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from typing import Any

import jsonschema
import openai
import pytest

from tests.server.conftest import MODEL, ServerHandle

pytestmark = pytest.mark.slow

WEATHER_PARAMETERS = {"type": "object",
                      "properties": {"city": {"type": "string", "maxLength": 30},
                                     "unit": {"enum": ["celsius", "fahrenheit"]}},
                      "required": ["city", "unit"], "additionalProperties": False}
ADD_PARAMETERS = {"type": "object",
                  "properties": {"a": {"type": "integer", "minimum": -100, "maximum": 100},
                                 "b": {"type": "integer", "minimum": -100, "maximum": 100}},
                  "required": ["a", "b"], "additionalProperties": False}
TOOLS: list[Any] = [
    {"type": "function", "function": {"name": "get_weather",
                                      "description": "The current weather in a city",
                                      "parameters": WEATHER_PARAMETERS}},
    {"type": "function", "function": {"name": "add", "description": "Adds two integers",
                                      "parameters": ADD_PARAMETERS}}]
SCHEMAS = {"get_weather": WEATHER_PARAMETERS, "add": ADD_PARAMETERS}
ASK: list[Any] = [{"role": "user", "content": "What is the weather in Paris?"}]


def _call(city: str, number: int) -> dict[str, Any]:
    return {"role": "assistant", "content": None, "tool_calls": [{
        "id": f"call_{number}", "type": "function",
        "function": {"name": "get_weather",
                     "arguments": json.dumps({"city": city, "unit": "celsius"})}}]}


# Two earlier questions answered by calls: the embedded model answers the third the same way.
LED: list[Any] = [{"role": "user", "content": "Weather in London?"}, _call("London", 1),
                  {"role": "user", "content": "Weather in Rome?"}, _call("Rome", 2),
                  {"role": "user", "content": "Weather in Paris?"}]


@pytest.fixture(scope="module")
def client(server: ServerHandle) -> Iterator[openai.OpenAI]:
    with openai.OpenAI(base_url=f"{server.http_url}/v1", api_key="none", max_retries=0) as c:
        yield c


def _validate_calls(calls: Any) -> list[tuple[str, dict[str, Any]]]:
    assert calls
    out = []
    for call in calls:
        assert call.type == "function" and call.id.startswith("call_")
        arguments = json.loads(call.function.arguments)
        jsonschema.validate(arguments, SCHEMAS[call.function.name])
        out.append((call.function.name, arguments))
    return out


def test_a_named_tool_gets_valid_arguments(client: openai.OpenAI) -> None:
    for seed in range(2):
        response = client.chat.completions.create(
            model=MODEL, messages=ASK, tools=TOOLS, temperature=0.8, seed=seed, max_tokens=120,
            tool_choice={"type": "function", "function": {"name": "get_weather"}})
        choice = response.choices[0]
        assert choice.finish_reason == "stop" and choice.message.content is None
        assert [name for name, _ in _validate_calls(choice.message.tool_calls)] == \
            ["get_weather"]


def test_required_calls_offered_tools_with_valid_arguments(client: openai.OpenAI) -> None:
    for seed in range(2):
        response = client.chat.completions.create(
            model=MODEL, messages=[{"role": "user", "content": "Add 2 and 3."}], tools=TOOLS,
            tool_choice="required", temperature=0.8, seed=seed, max_tokens=200)
        choice = response.choices[0]
        assert choice.finish_reason == "tool_calls"
        _validate_calls(choice.message.tool_calls)


def test_auto_returns_the_call_the_model_writes(client: openai.OpenAI) -> None:
    response = client.chat.completions.create(model=MODEL, messages=LED, tools=TOOLS,
                                              temperature=0, max_tokens=80)
    choice = response.choices[0]
    assert choice.finish_reason == "tool_calls"
    ((name, arguments),) = _validate_calls(choice.message.tool_calls)
    assert name == "get_weather" and arguments["city"] == "Paris"
    # Asked plainly, it answers in words: content, no calls.
    plain = client.chat.completions.create(model=MODEL, messages=ASK, tools=TOOLS,
                                           tool_choice="auto", temperature=0, max_tokens=30)
    assert plain.choices[0].message.tool_calls is None
    assert plain.choices[0].message.content
    assert "<tool_call>" not in plain.choices[0].message.content


def test_streamed_tool_calls_equal_the_whole_ones(client: openai.OpenAI) -> None:
    for tool_choice in ("auto", {"type": "function", "function": {"name": "get_weather"}}):
        whole = client.chat.completions.create(model=MODEL, messages=LED, tools=TOOLS,
                                               tool_choice=tool_choice,  # type: ignore[arg-type]
                                               temperature=0, max_tokens=80)
        stream = client.chat.completions.create(model=MODEL, messages=LED, tools=TOOLS,
                                                tool_choice=tool_choice,  # type: ignore[arg-type]
                                                temperature=0, max_tokens=80, stream=True)
        names: dict[int, str] = {}
        arguments: dict[int, str] = {}
        content = ""
        finish = None
        for chunk in stream:
            delta = chunk.choices[0].delta
            content += delta.content or ""
            for call in delta.tool_calls or []:
                if call.function and call.function.name:
                    names[call.index] = call.function.name
                arguments[call.index] = (arguments.get(call.index, "")
                                         + (call.function.arguments or "" if call.function
                                            else ""))
            finish = chunk.choices[0].finish_reason or finish
        expected = whole.choices[0]
        assert finish == expected.finish_reason
        assert content == (expected.message.content or "")
        assert expected.message.tool_calls is not None
        assert [(names[i], json.loads(arguments[i])) for i in sorted(names)] == [
            (c.function.name, json.loads(c.function.arguments))
            for c in expected.message.tool_calls]


@pytest.mark.parametrize(("extra", "param"), [
    (dict(tool_choice="required"), "tool_choice"),  # no tools
    (dict(tools=TOOLS, tool_choice={"type": "function", "function": {"name": "nope"}}),
     "tool_choice"),
    (dict(tools=[{"type": "function", "function": {"name": "has space"}}]), "tools"),
    (dict(tools=TOOLS, tool_choice="required", response_format={"type": "json_object"}),
     "response_format"),
    (dict(tools=[{"type": "function", "function": {
        "name": "f", "parameters": {"type": "object", "properties": {"x": {"type": "nope"}}}}}],
          tool_choice="required"), "tools"),  # refused when its schema is compiled
])
def test_bad_tools_are_400s_naming_the_field(client: openai.OpenAI, extra: dict[str, Any],
                                             param: str) -> None:
    with pytest.raises(openai.BadRequestError) as refused:
        client.chat.completions.create(model=MODEL, messages=ASK, max_tokens=8,
                                       **extra)
    body = refused.value.body
    assert isinstance(body, dict)
    assert body.get("param") == param, body
    # The server serves on.
    ok = client.chat.completions.create(model=MODEL, messages=ASK, max_tokens=4)
    assert ok.choices[0].message.content
