"""Tool calling's pieces without a server: the plan, the formats, whole answers and streams.

The end-to-end behaviour (the ``openai`` client against a real server) is in
``tests/server/test_openai_tools.py``.
"""

from __future__ import annotations

import json
from typing import Any

import jsonschema
import pytest

from pagedserve.server.http.openai.tools.answer import ChoiceStream, whole
from pagedserve.server.http.openai.tools.parsers import (
    HermesParser,
    Llama3JsonParser,
    MistralParser,
    content_boundary,
    parser_for_template,
)
from pagedserve.server.http.openai.tools.plan import ToolError, plan_tools
from pagedserve.server.http.openai.tools.prompt import conversation_with_tools, renders_tools

WEATHER = {"type": "function", "function": {
    "name": "get_weather", "description": "The weather in a city",
    "parameters": {"type": "object", "properties": {"city": {"type": "string"}},
                   "required": ["city"]}}}
ADD = {"type": "function", "function": {
    "name": "add", "parameters": {"type": "object",
                                  "properties": {"a": {"type": "integer"},
                                                 "b": {"type": "integer"}}}}}
NAMES = {"get_weather", "add"}


@pytest.mark.parametrize(("tools", "choice", "message"), [
    (None, "auto", "`tools` must be set"),
    ([WEATHER], {"type": "function", "function": {"name": "nope"}}, "not among the tools"),
    ([WEATHER], {"type": "function"}, "tool_choice.function.name"),
    ([WEATHER], "sometimes", "tool_choice must be"),
    ([{"type": "retrieval"}], "auto", r"tools\[0\].type"),
    ([{"type": "function", "function": {"name": "bad name!"}}], "auto", "function.name"),
    ([{"type": "function", "function": {"name": "f", "parameters": [1]}}], "auto",
     "parameters must be a JSON schema object"),
    ([WEATHER, WEATHER], "auto", "unique"),
])
def test_bad_tools_and_choices_are_refused_by_name(tools: Any, choice: Any,
                                                   message: str) -> None:
    with pytest.raises(ToolError, match=message) as refused:
        plan_tools(tools, choice)
    assert refused.value.param in ("tools", "tool_choice")


def test_the_plan_of_each_choice() -> None:
    assert plan_tools(None, None).mode == "none"
    assert plan_tools([WEATHER], None).mode == "auto"  # OpenAI's default with tools
    assert not plan_tools([WEATHER], "none").offered
    assert plan_tools([WEATHER], "auto").constraint() is None
    named = plan_tools([WEATHER, ADD], {"type": "function", "function": {"name": "add"}})
    constraint = named.constraint()
    assert constraint is not None and json.loads(str(constraint.json)) == \
        ADD["function"]["parameters"]


def test_required_schema_takes_exactly_calls_of_the_offered_tools() -> None:
    constraint = plan_tools([WEATHER, ADD], "required").constraint()
    assert constraint is not None
    schema = json.loads(str(constraint.json))
    jsonschema.validate([{"name": "add", "parameters": {"a": 1, "b": 2}},
                         {"name": "get_weather", "parameters": {"city": "Oslo"}}], schema)
    for bad in ([], [{"name": "other", "parameters": {}}],
                [{"name": "get_weather", "parameters": {}}], [{"name": "add"}]):
        with pytest.raises(jsonschema.ValidationError):
            jsonschema.validate(bad, schema)


def test_hermes_calls_and_content() -> None:
    parser = HermesParser()
    text = ('Let me check.\n<tool_call>\n{"name": "get_weather", "arguments": {"city": "Oslo"}}'
            '\n</tool_call>\n<tool_call>{"name": "add", "arguments": {"a": 1, "b": 2}}')
    parsed = parser.parse(text, NAMES)
    assert parsed.content == "Let me check."
    assert [(c.name, json.loads(c.arguments)) for c in parsed.calls] == [
        ("get_weather", {"city": "Oslo"}), ("add", {"a": 1, "b": 2})]
    assert parser.complete(text, NAMES) == 1  # the second is not closed yet
    # A call of an unknown tool, or arguments that are no object, stay text.
    for text in ('<tool_call>{"name": "rm", "arguments": {}}</tool_call>',
                 '<tool_call>{"name": "add", "arguments": "1+2"}</tool_call>',
                 "<tool_call>{not json</tool_call>", "no calls here"):
        assert parser.parse(text, NAMES).calls == []
        assert parser.parse(text, NAMES).content == text


def test_mistral_and_llama3_formats() -> None:
    mistral = MistralParser().parse(
        'ok[TOOL_CALLS][{"name": "add", "arguments": {"a": 1, "b": 2}}]', NAMES)
    assert mistral.content == "ok" and mistral.calls[0].name == "add"
    llama = Llama3JsonParser().parse(
        '<|python_tag|>{"name": "get_weather", "parameters": {"city": "Rome"}}', NAMES)
    assert llama.calls[0].name == "get_weather"
    assert json.loads(llama.calls[0].arguments) == {"city": "Rome"}
    bare = Llama3JsonParser().parse('{"name": "add", "parameters": {"a": 2, "b": 3}}', NAMES)
    assert [c.name for c in bare.calls] == ["add"] and bare.content is None


def test_the_template_names_the_format() -> None:
    assert isinstance(parser_for_template("{{ '[TOOL_CALLS]' }}"), MistralParser)
    assert isinstance(parser_for_template("<|python_tag|>"), Llama3JsonParser)
    assert isinstance(parser_for_template("{% for m in messages %}"), HermesParser)
    assert isinstance(parser_for_template(None), HermesParser)


def test_content_boundary_holds_back_a_possible_marker() -> None:
    parser = HermesParser()
    assert content_boundary(parser, "Hello <tool") == len("Hello ")
    assert content_boundary(parser, "Hello <b>") == len("Hello <b>")
    assert content_boundary(parser, "Hi <tool_call>{") == len("Hi ")
    assert content_boundary(Llama3JsonParser(), ' {"name"') == 0


def test_whole_answers() -> None:
    auto = plan_tools([WEATHER, ADD], "auto")
    text = '<tool_call>{"name": "add", "arguments": {"a": 1, "b": 2}}</tool_call>'
    answer = whole(text, "stop", auto, HermesParser())
    assert answer.finish_reason == "tool_calls" and answer.content is None
    message = answer.message()
    assert message["tool_calls"][0]["function"] == {"name": "add",
                                                    "arguments": '{"a": 1, "b": 2}'}
    assert message["tool_calls"][0]["id"].startswith("call_")
    required = plan_tools([WEATHER, ADD], "required")
    cut = whole('[{"name": "add", "param', "length", required, HermesParser())
    assert cut.calls == [] and cut.content is not None and cut.finish_reason == "length"
    none = whole(text, "stop", plan_tools([WEATHER], "none"), HermesParser())
    assert none.calls == [] and none.content == text


def _streamed(stream: ChoiceStream, pieces: list[str]) -> list[dict[str, Any]]:
    out = []
    for i, piece in enumerate(pieces):
        out += stream.feed(piece, i == len(pieces) - 1)
    return out


def test_auto_stream_sends_content_then_the_calls() -> None:
    plan = plan_tools([WEATHER, ADD], "auto")
    stream = ChoiceStream(plan, HermesParser())
    deltas = _streamed(stream, ["Sure. ", "<tool", '_call>{"name": "add", ',
                                '"arguments": {"a": 1, "b": 2}}', "</tool_call>"])
    content = "".join(d.get("content", "") for d in deltas)
    assert content == "Sure. "
    calls = [d["tool_calls"][0] for d in deltas if "tool_calls" in d]
    assert [(c["index"], c["function"]["name"]) for c in calls] == [(0, "add")]
    assert stream.finish_reason("stop") == "tool_calls"
    # Text that only looked like a call's beginning is sent in the end.
    stream = ChoiceStream(plan, HermesParser())
    deltas = _streamed(stream, ["a <tool", "box> b"])
    assert "".join(d.get("content", "") for d in deltas) == "a <toolbox> b"
    assert stream.finish_reason("stop") == "stop"


def test_named_stream_sends_the_arguments_as_they_come() -> None:
    plan = plan_tools([WEATHER], {"type": "function", "function": {"name": "get_weather"}})
    stream = ChoiceStream(plan, HermesParser())
    deltas = _streamed(stream, ['{"ci', 'ty": "Oslo"}', ""])
    first = deltas[0]["tool_calls"][0]
    assert first["function"]["name"] == "get_weather" and first["id"].startswith("call_")
    arguments = "".join(d["tool_calls"][0]["function"]["arguments"] for d in deltas)
    assert json.loads(arguments) == {"city": "Oslo"}


def test_tools_are_written_into_a_template_that_does_not_render_them() -> None:
    plan = plan_tools([WEATHER], "auto")
    messages = conversation_with_tools([
        {"role": "user", "content": "Weather in Oslo?"},
        {"role": "assistant", "content": None, "tool_calls": [{
            "id": "c1", "type": "function",
            "function": {"name": "get_weather", "arguments": '{"city": "Oslo"}'}}]},
        {"role": "tool", "tool_call_id": "c1", "content": "12 C"}], plan)
    assert messages[0]["role"] == "system" and '"get_weather"' in messages[0]["content"]
    call = messages[2]["content"]
    assert call.startswith("<tool_call>") and '"city": "Oslo"' in call
    assert messages[3] == {"role": "user", "content": "<tool_response>\n12 C\n</tool_response>"}
    assert not renders_tools("{% for m in messages %}{{ m.content }}{% endfor %}")
    assert renders_tools("{% if tools %}{{ tools | tojson }}{% endif %}")
