"""Tools in the conversation, for the chat template.

A template that renders tools itself (its source mentions ``tools``) gets them as
``apply_chat_template(tools=...)`` and the messages as they came, tool calls and tool results
included. One that does not (SmolLM2's, plain ChatML) would drop them silently; the model is
then told about the tools in a system message, in the Hermes words Qwen's template uses, and
earlier calls and results are written into the messages in the same format, so that the
model's answer can be parsed (``parsers.HermesParser``).
"""

from __future__ import annotations

import json
from typing import Any

from pagedserve.server.http.openai.tools.plan import ToolPlan

_PREAMBLE = ("# Tools\n\nYou may call one or more functions to assist with the user query.\n\n"
             "You are provided with function signatures within <tools></tools> XML tags:\n"
             "<tools>\n{tools}\n</tools>\n\nFor each function call, return a json object with "
             "function name and arguments within <tool_call></tool_call> XML tags:\n"
             "<tool_call>\n{{\"name\": <function-name>, \"arguments\": <args-json-object>}}\n"
             "</tool_call>")


def renders_tools(template: str | None) -> bool:
    return template is not None and "tools" in template


def conversation_with_tools(messages: list[dict[str, Any]], plan: ToolPlan
                            ) -> list[dict[str, Any]]:
    """The messages with the tools described in the system message, and tool calls and
    results written as Hermes text: for templates that do not render tools."""
    out = [_as_text(m) for m in messages]
    if not plan.offered:
        return out
    tools = "\n".join(json.dumps(t.spec, ensure_ascii=False) for t in plan.tools)
    preamble = _PREAMBLE.format(tools=tools)
    if out and out[0]["role"] == "system":
        out[0] = {**out[0], "content": f"{out[0]['content'] or ''}\n\n{preamble}".lstrip()}
    else:
        out.insert(0, {"role": "system", "content": preamble})
    return out


def _as_text(message: dict[str, Any]) -> dict[str, Any]:
    calls = message.get("tool_calls")
    if message["role"] == "assistant" and calls:
        parts = [message.get("content") or ""]
        for call in calls:
            function = call.get("function", {}) if isinstance(call, dict) else {}
            arguments = function.get("arguments", "{}")
            value = {"name": function.get("name"),
                     "arguments": _json_or_text(arguments)}
            parts.append(f"<tool_call>\n{json.dumps(value, ensure_ascii=False)}\n</tool_call>")
        return {"role": "assistant", "content": "\n".join(p for p in parts if p)}
    if message["role"] == "tool":
        return {"role": "user",
                "content": f"<tool_response>\n{message.get('content') or ''}\n</tool_response>"}
    return {k: v for k, v in message.items() if k in ("role", "content", "name")}


def _json_or_text(arguments: Any) -> Any:
    if isinstance(arguments, str):
        try:
            return json.loads(arguments)
        except ValueError:
            return arguments
    return arguments
