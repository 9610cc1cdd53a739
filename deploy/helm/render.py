"""Renders the pagedserve chart without a helm binary: the subset of Go templates it uses.

    python deploy/helm/render.py deploy/helm/pagedserve [RELEASE] [NAMESPACE]

The subset: ``{{ pipeline }}`` with ``{{-``/``-}}`` trimming and ``{{/* comments */}}``;
``if``/``else``/``end`` and ``range``/``end`` (dot is the element); terms ``.``, ``.a.b``,
``$.a.b``, quoted strings and integers; the functions ``quote``, ``toYaml``, ``indent``,
``nindent`` and ``not``, called as ``f x`` or piped (``x | f``). Anything else is an error rather
than a guess, so the chart cannot quietly use what this renderer would render wrongly. Values,
``.Release`` and ``.Chart`` are named as Helm names them.
"""

from __future__ import annotations

import json
import re
import sys
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

_ACTION = re.compile(r"\{\{(-\s)?\s*(.*?)\s*(\s-)?\}\}", re.S)
_TOKEN = re.compile(r'"(?:[^"\\]|\\.)*"|[^\s|]+|\|')


class TemplateError(ValueError):
    """A template outside the subset, or a value it names that is missing."""


@dataclass
class _Node:
    kind: str  # text, output, if, range
    text: str = ""
    body: list[_Node] = field(default_factory=list)
    orelse: list[_Node] = field(default_factory=list)


def _lex(source: str) -> list[tuple[str, str]]:
    """Text and action pieces, with Go's whitespace trimming applied."""
    pieces: list[tuple[str, str]] = []
    position, trim_next = 0, False
    for match in _ACTION.finditer(source):
        text = source[position:match.start()]
        if trim_next:
            text = text.lstrip()
        if match.group(1):
            text = text.rstrip()
        pieces.append(("text", text))
        if not match.group(2).startswith("/*"):
            pieces.append(("action", match.group(2)))
        position, trim_next = match.end(), bool(match.group(3))
    tail = source[position:]
    pieces.append(("text", tail.lstrip() if trim_next else tail))
    return pieces


def _parse(pieces: list[tuple[str, str]], where: str) -> list[_Node]:
    root: list[_Node] = []
    stack: list[tuple[_Node | None, list[_Node]]] = [(None, root)]
    for kind, text in pieces:
        nodes = stack[-1][1]
        if kind == "text":
            if text:
                nodes.append(_Node("text", text))
            continue
        word, _, rest = text.partition(" ")
        if word in ("if", "range"):
            node = _Node(word, rest.strip())
            nodes.append(node)
            stack.append((node, node.body))
        elif word == "else" and not rest:
            block = stack[-1][0]
            if block is None or block.kind != "if":
                raise TemplateError(f"{where}: 'else' outside an 'if'")
            stack[-1] = (block, block.orelse)
        elif word == "end" and not rest:
            if len(stack) == 1:
                raise TemplateError(f"{where}: 'end' without a block")
            stack.pop()
        elif word in ("with", "define", "template", "include", "block") or ":=" in text:
            raise TemplateError(f"{where}: '{text}' is outside the renderer's subset")
        else:
            nodes.append(_Node("output", text))
    if len(stack) != 1:
        raise TemplateError(f"{where}: a block is not closed with 'end'")
    return root


def _indent(width: int, text: str) -> str:
    pad = " " * width
    return pad + text.replace("\n", "\n" + pad)


def _to_yaml(value: Any) -> str:
    if not isinstance(value, dict | list):
        raise TemplateError(f"toYaml of a scalar ({value!r}): print it instead")
    # Helm's toYaml sorts keys (it goes through JSON) and drops the final newline.
    return yaml.safe_dump(value, sort_keys=True, default_flow_style=False).rstrip("\n")


_FUNCTIONS: dict[str, Callable[..., Any]] = {
    "quote": lambda value: json.dumps(_format(value)),
    "toYaml": _to_yaml,
    "indent": _indent,
    "nindent": lambda width, text: "\n" + _indent(width, text),
    "not": lambda value: not _truthy(value),
}


def _truthy(value: Any) -> bool:
    return value not in (None, False, 0, "") and value != [] and value != {}


def _format(value: Any) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, int | float | str):
        return str(value)
    raise TemplateError(f"cannot print {type(value).__name__} {value!r}: use toYaml")


@dataclass(frozen=True)
class _Scope:
    dot: Any
    root: dict[str, Any]


def _lookup(value: Any, path: str, term: str) -> Any:
    for key in filter(None, path.split(".")):
        if not isinstance(value, dict):
            raise TemplateError(f"'{term}': '{key}' looked up in a {type(value).__name__}")
        value = value.get(key)
    return value


def _term(token: str, scope: _Scope) -> Any:
    if token.startswith('"'):
        return json.loads(token)
    if re.fullmatch(r"-?\d+", token):
        return int(token)
    if token == "$" or token.startswith("$."):
        return _lookup(scope.root, token[1:], token)
    if token.startswith("."):
        return _lookup(scope.dot, token, token)
    raise TemplateError(f"unknown term '{token}'")


def _pipeline(text: str, scope: _Scope) -> Any:
    tokens = _TOKEN.findall(text)
    commands: list[list[str]] = [[]]
    for token in tokens:
        if token == "|":
            commands.append([])
        else:
            commands[-1].append(token)
    value: Any = None
    for index, command in enumerate(commands):
        if not command:
            raise TemplateError(f"empty command in '{text}'")
        name, args = command[0], [_term(token, scope) for token in command[1:]]
        if index > 0:
            args.append(value)
        if name in _FUNCTIONS:
            value = _FUNCTIONS[name](*args)
        elif args:
            raise TemplateError(f"'{name}' is not a function of the subset, in '{text}'")
        else:
            value = _term(name, scope)
    return value


def _render(nodes: list[_Node], scope: _Scope, out: list[str]) -> None:
    for node in nodes:
        if node.kind == "text":
            out.append(node.text)
        elif node.kind == "output":
            value = _pipeline(node.text, scope)
            if value is None:
                raise TemplateError(f"'{node.text}' has no value")
            out.append(_format(value))
        elif node.kind == "if":
            branch = node.body if _truthy(_pipeline(node.text, scope)) else node.orelse
            _render(branch, scope, out)
        else:
            items = _pipeline(node.text, scope) or []
            if not isinstance(items, list):
                raise TemplateError(f"range over {type(items).__name__} in '{node.text}'")
            for item in items:
                _render(node.body, _Scope(item, scope.root), out)


def render_template(source: str, root: dict[str, Any], where: str = "template") -> str:
    """One template rendered with ``root`` (``Values``, ``Release``, ``Chart``) as dot."""
    out: list[str] = []
    _render(_parse(_lex(source), where), _Scope(root, root), out)
    return "".join(out)


def _merge(base: dict[str, Any], override: dict[str, Any]) -> dict[str, Any]:
    merged = dict(base)
    for key, value in override.items():
        if isinstance(value, dict) and isinstance(merged.get(key), dict):
            merged[key] = _merge(merged[key], value)
        else:
            merged[key] = value
    return merged


def render_sources(chart: Path, release: str = "pagedserve", namespace: str = "default",
                   values: dict[str, Any] | None = None) -> dict[str, str]:
    """Each template's rendered text by file name, as ``helm template RELEASE CHART`` gives it."""
    meta = yaml.safe_load((chart / "Chart.yaml").read_text())
    root = {
        "Values": _merge(yaml.safe_load((chart / "values.yaml").read_text()), values or {}),
        "Release": {"Name": release, "Namespace": namespace, "Service": "Helm"},
        "Chart": {"Name": meta["name"], "Version": meta["version"],
                  "AppVersion": meta.get("appVersion", "")},
    }
    return {template.name: render_template(template.read_text(), root, template.name)
            for template in sorted((chart / "templates").glob("*.yaml"))}


def render_chart(chart: Path, release: str = "pagedserve", namespace: str = "default",
                 values: dict[str, Any] | None = None) -> list[dict[str, Any]]:
    """The chart's non-empty documents, parsed."""
    sources = render_sources(chart, release, namespace, values)
    return [doc for text in sources.values() for doc in yaml.safe_load_all(text) if doc]


if __name__ == "__main__":
    arguments = sys.argv[1:]
    if not 1 <= len(arguments) <= 3:
        sys.exit(__doc__)
    chart_dir = Path(arguments[0])
    release_name = arguments[1] if len(arguments) > 1 else "pagedserve"
    namespace_name = arguments[2] if len(arguments) > 2 else "default"
    for name, text in render_sources(chart_dir, release_name, namespace_name).items():
        if text.strip():
            print(f"---\n# Source: {chart_dir.name}/templates/{name}\n{text.strip()}")
