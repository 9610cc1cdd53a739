"""A chat choice's text as the client sees it under the request's tool plan: content, tool
calls and finish reason, whole (``whole``) or as stream deltas (``ChoiceStream``)."""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from typing import Any

from pagedserve.server.http.openai.tools.parsers import ToolParser, content_boundary
from pagedserve.server.http.openai.tools.plan import ToolCall, ToolPlan


@dataclass(frozen=True)
class Answer:
    content: str | None
    calls: list[ToolCall]
    finish_reason: str | None

    def message(self) -> dict[str, Any]:
        message: dict[str, Any] = {"role": "assistant", "content": self.content}
        if self.calls:
            message["tool_calls"] = [c.to_json() for c in self.calls]
        return message


def _required_calls(text: str, plan: ToolPlan) -> list[ToolCall]:
    """The calls of a ``required`` answer: a JSON array of ``{"name", "parameters"}``."""
    try:
        values = json.loads(text)
    except (ValueError, RecursionError):
        return []
    names = plan.names()
    calls = [ToolCall(v["name"], json.dumps(v["parameters"], ensure_ascii=False))
             for v in values if isinstance(values, list) and isinstance(v, dict)
             and v.get("name") in names and isinstance(v.get("parameters"), dict)]
    return calls if isinstance(values, list) and len(calls) == len(values) else []


def whole(text: str, finish_reason: str | None, plan: ToolPlan,
          parser: ToolParser) -> Answer:
    """A finished choice's answer. A forced call's text is its arguments; a ``required``
    answer's, the array of calls; an ``auto`` one is parsed in the model's own format. Text
    that does not parse (cut by ``max_tokens``) stays content."""
    if plan.mode == "named" and plan.named is not None:
        return Answer(None, [ToolCall(plan.named, text)], finish_reason)
    if plan.mode == "required":
        calls = _required_calls(text, plan)
        return (Answer(None, calls, "tool_calls") if calls
                else Answer(text, [], finish_reason))
    if plan.mode == "auto":
        parsed = parser.parse(text, plan.names())
        if parsed.calls:
            return Answer(parsed.content, parsed.calls, "tool_calls")
    return Answer(text, [], finish_reason)


def _call_delta(index: int, call: ToolCall) -> dict[str, Any]:
    return {"tool_calls": [{"index": index, **call.to_json()}]}


@dataclass
class ChoiceStream:
    """One choice's stream under a tool plan: each ``feed`` turns the choice's new text into
    the deltas to send (content while it is surely content, tool calls once known)."""

    plan: ToolPlan
    parser: ToolParser
    text: str = ""
    content_sent: int = 0  # characters of ``text`` sent as content
    call_id: str | None = None  # a forced call's id, sent with its first delta
    calls_sent: bool = field(default=False)

    def feed(self, delta: str, finished: bool) -> list[dict[str, Any]]:
        self.text += delta
        mode = self.plan.mode
        if mode == "named" and self.plan.named is not None:
            return self._named(delta)
        if mode not in ("auto", "required"):
            return [{"content": delta}] if delta or finished else []
        out: list[dict[str, Any]] = []
        if mode == "auto":
            boundary = content_boundary(self.parser, self.text)
            if boundary > self.content_sent:
                out.append({"content": self.text[self.content_sent:boundary]})
                self.content_sent = boundary
        if finished:
            answer = whole(self.text, None, self.plan, self.parser)
            if answer.calls:
                self.calls_sent = True
                out += [_call_delta(i, c) for i, c in enumerate(answer.calls)]
            elif len(self.text) > self.content_sent:
                out.append({"content": self.text[self.content_sent:]})
                self.content_sent = len(self.text)
        return out

    def _named(self, delta: str) -> list[dict[str, Any]]:
        if self.call_id is None:
            first = ToolCall(str(self.plan.named), delta).to_json()
            self.call_id = first["id"]
            return [{"tool_calls": [{"index": 0, **first}]}]
        if not delta:
            return []
        return [{"tool_calls": [{"index": 0, "function": {"arguments": delta}}]}]

    def finish_reason(self, engine_reason: str | None) -> str | None:
        return "tool_calls" if self.calls_sent else engine_reason
