"""The model's own tool-call formats: text in, content and calls out.

Which format a model writes is read from its chat template, as the template defines how tool
calls appear in a conversation: Hermes' ``<tool_call>{...}</tool_call>`` (Qwen, Hermes and
most ChatML models), Mistral's ``[TOOL_CALLS][...]`` and Llama 3's ``<|python_tag|>`` or bare
``{"name": ..., "parameters": ...}``. A template that mentions none of them gets Hermes, which
``prompt`` teaches it.

Calls are kept only where they name an offered tool and their arguments are a JSON object;
anything else stays content, so nothing the model wrote is lost.
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass
from typing import Any

from pagedserve.server.http.openai.tools.plan import ToolCall


@dataclass(frozen=True)
class Parsed:
    content: str | None  # the text outside the calls; None when there is none
    calls: list[ToolCall]


def _call(value: Any, names: set[str], arguments_key: str = "arguments") -> ToolCall | None:
    if not isinstance(value, dict):
        return None
    name = value.get("name")
    arguments = value.get(arguments_key, value.get("arguments", value.get("parameters", {})))
    if not isinstance(name, str) or name not in names or not isinstance(arguments, dict):
        return None
    return ToolCall(name, json.dumps(arguments, ensure_ascii=False))


def _loads(text: str) -> Any:
    try:
        return json.loads(text)
    except (ValueError, RecursionError):
        return None


class HermesParser:
    """``<tool_call>\\n{"name": ..., "arguments": {...}}\\n</tool_call>``, any number of them;
    an unclosed last one (the model stopped at its end token) counts."""

    name = "hermes"
    start = "<tool_call>"
    _CALL = re.compile(r"<tool_call>(.*?)(?:</tool_call>|\Z)", re.DOTALL)

    def parse(self, text: str, names: set[str]) -> Parsed:
        if self.start not in text:
            return Parsed(text, [])
        calls = []
        for match in self._CALL.finditer(text):
            call = _call(_loads(match.group(1).strip()), names)
            if call is None:
                return Parsed(text, [])
            calls.append(call)
        content = text[:text.index(self.start)].strip()
        return Parsed(content or None, calls)

    def complete(self, text: str, names: set[str]) -> int:
        """How many calls of ``text`` (a stream so far) are closed and well formed."""
        return sum(1 for body in re.findall(r"<tool_call>(.*?)</tool_call>", text, re.DOTALL)
                   if _call(_loads(body.strip()), names) is not None)


class MistralParser:
    """``[TOOL_CALLS][{"name": ..., "arguments": {...}}, ...]``."""

    name = "mistral"
    start = "[TOOL_CALLS]"

    def parse(self, text: str, names: set[str]) -> Parsed:
        if self.start not in text:
            return Parsed(text, [])
        head, _, tail = text.partition(self.start)
        values = _loads(tail.strip())
        values = values if isinstance(values, list) else [values]
        calls = [_call(v, names) for v in values]
        if not calls or any(c is None for c in calls):
            return Parsed(text, [])
        return Parsed(head.strip() or None, [c for c in calls if c is not None])

    def complete(self, text: str, names: set[str]) -> int:
        return 0  # one array: its calls are known when it ends


class Llama3JsonParser:
    """``<|python_tag|>{"name": ..., "parameters": {...}}`` or the bare object, several
    joined by ``;``."""

    name = "llama3_json"
    start = "<|python_tag|>"

    def parse(self, text: str, names: set[str]) -> Parsed:
        body = text.split(self.start, 1)[1] if self.start in text else text
        stripped = body.strip()
        if not stripped.startswith("{"):
            return Parsed(text, [])
        calls = [_call(_loads(part), names, "parameters") for part in stripped.split(";")]
        if any(c is None for c in calls):
            return Parsed(text, [])
        head = text.split(self.start, 1)[0].strip() if self.start in text else ""
        return Parsed(head or None, [c for c in calls if c is not None])

    def complete(self, text: str, names: set[str]) -> int:
        return 0


ToolParser = HermesParser | MistralParser | Llama3JsonParser


def content_boundary(parser: ToolParser, text: str) -> int:
    """How much of ``text`` (a stream so far) is surely content: everything before the
    parser's start marker, less a tail that may be the marker's beginning (or nothing, for a
    Llama 3 text that opens as a bare JSON object)."""
    if isinstance(parser, Llama3JsonParser) and text.lstrip().startswith("{"):
        return 0
    found = text.find(parser.start)
    if found >= 0:
        return found
    for keep in range(min(len(parser.start) - 1, len(text)), 0, -1):
        if parser.start.startswith(text[-keep:]):
            return len(text) - keep
    return len(text)


def parser_for_template(template: str | None) -> ToolParser:
    """The format the chat template writes tool calls in (Hermes when it shows none)."""
    text = template or ""
    if "[TOOL_CALLS]" in text:
        return MistralParser()
    if "<|python_tag|>" in text or "ipython" in text:
        return Llama3JsonParser()
    return HermesParser()
