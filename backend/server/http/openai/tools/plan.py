"""The request's ``tools`` and ``tool_choice``, checked, and the constraint they imply.

vLLM's rule: a named ``tool_choice`` constrains the output to that function's parameters
schema, ``required`` to a JSON array of calls of the offered tools (at least one); ``auto``
leaves the output free and parses the model's own tool-call format; ``none`` neither constrains
nor parses. Without ``tools`` there is no choice to make.
"""

from __future__ import annotations

import re
import uuid
from dataclasses import dataclass
from typing import Any

from pagedserve.structured_outputs import StructuredOutputsParams

MAX_TOOLS = 128
_NAME = re.compile(r"[A-Za-z0-9_.\-]{1,64}")
_EMPTY_PARAMETERS: dict[str, Any] = {"type": "object", "properties": {}}


class ToolError(ValueError):
    """A bad ``tools`` or ``tool_choice``; ``param`` names the field."""

    def __init__(self, message: str, param: str) -> None:
        super().__init__(message)
        self.param = param


@dataclass(frozen=True)
class Tool:
    name: str
    parameters: dict[str, Any]
    spec: dict[str, Any]  # the request's own entry, for the chat template


@dataclass(frozen=True)
class ToolCall:
    name: str
    arguments: str  # JSON text, as OpenAI sends it

    def to_json(self) -> dict[str, Any]:
        return {"id": f"call_{uuid.uuid4().hex[:24]}", "type": "function",
                "function": {"name": self.name, "arguments": self.arguments}}


@dataclass(frozen=True)
class ToolPlan:
    """What the chat door does about tools for one request."""

    mode: str  # "none", "auto", "required" or "named"
    tools: tuple[Tool, ...] = ()
    named: str | None = None  # the function a named choice forces

    @property
    def offered(self) -> bool:
        """Whether the model is told about the tools (every mode but ``none``)."""
        return self.mode != "none" and bool(self.tools)

    def names(self) -> set[str]:
        return {t.name for t in self.tools}

    def constraint(self) -> StructuredOutputsParams | None:
        """The output's schema for ``named`` and ``required``; ``None`` otherwise."""
        if self.mode == "named":
            tool = next(t for t in self.tools if t.name == self.named)
            return StructuredOutputsParams(json=tool.parameters, source="tools")
        if self.mode == "required":
            calls = [{"type": "object",
                      "properties": {"name": {"type": "string", "enum": [t.name]},
                                     "parameters": t.parameters},
                      "required": ["name", "parameters"]} for t in self.tools]
            return StructuredOutputsParams(json={
                "type": "array", "minItems": 1,
                "items": {"type": "object", "anyOf": calls}}, source="tools")
        return None


def plan_tools(tools: list[Any] | None, tool_choice: Any) -> ToolPlan:
    """Checks ``tools`` and ``tool_choice`` (``ToolError`` naming the field)."""
    if not tools:
        if tool_choice not in (None, "none"):
            raise ToolError("When using `tool_choice`, `tools` must be set.", "tool_choice")
        return ToolPlan("none")
    if len(tools) > MAX_TOOLS:
        raise ToolError(f"tools holds {len(tools)} tools, more than {MAX_TOOLS}", "tools")
    parsed = tuple(_tool(i, entry) for i, entry in enumerate(tools))
    names = [t.name for t in parsed]
    if len(set(names)) != len(names):
        raise ToolError("tools: function names must be unique", "tools")
    if tool_choice is None or tool_choice == "auto":
        return ToolPlan("auto", parsed)
    if tool_choice in ("none", "required"):
        return ToolPlan(tool_choice, parsed)
    if isinstance(tool_choice, dict) and tool_choice.get("type") == "function":
        function = tool_choice.get("function")
        name = function.get("name") if isinstance(function, dict) else None
        if not isinstance(name, str):
            raise ToolError("tool_choice.function.name is required", "tool_choice")
        if name not in names:
            raise ToolError(f"tool_choice: function {name[:64]!r} is not among the tools",
                            "tool_choice")
        return ToolPlan("named", parsed, name)
    raise ToolError('tool_choice must be "none", "auto", "required" or {"type": "function", '
                    '"function": {"name": ...}}', "tool_choice")


def _tool(index: int, entry: Any) -> Tool:
    where = f"tools[{index}]"
    if not isinstance(entry, dict) or entry.get("type") != "function":
        raise ToolError(f'{where}.type must be "function"', "tools")
    function = entry.get("function")
    if not isinstance(function, dict):
        raise ToolError(f"{where}.function must be an object", "tools")
    name = function.get("name")
    if not isinstance(name, str) or not _NAME.fullmatch(name):
        raise ToolError(f"{where}.function.name must be 1 to 64 letters, digits, '_', '.' or "
                        "'-'", "tools")
    parameters = function.get("parameters", _EMPTY_PARAMETERS)
    if not isinstance(parameters, dict):
        raise ToolError(f"{where}.function.parameters must be a JSON schema object", "tools")
    return Tool(name, parameters, entry)
