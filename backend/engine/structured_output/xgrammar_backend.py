"""Constraints compiled by xgrammar: the engine vLLM's ``auto`` tries first."""

from __future__ import annotations

import json
from typing import Any

import torch
import xgrammar as xgr

from pagedserve.engine.structured_output.matcher import CompiledConstraint
from pagedserve.structured_outputs import StructuredOutputsParams


class _Matcher:
    def __init__(self, compiled: xgr.CompiledGrammar) -> None:
        self._matcher = xgr.GrammarMatcher(compiled)

    def accept(self, token: int) -> bool:
        return bool(self._matcher.accept_token(token))

    def fill_bitmask(self, bitmask: torch.Tensor, row: int) -> None:
        self._matcher.fill_next_token_bitmask(bitmask, row)

    def rollback(self, num_tokens: int) -> None:
        self._matcher.rollback(num_tokens)

    def is_terminated(self) -> bool:
        return bool(self._matcher.is_terminated())


# Keywords xgrammar accepts but does not enforce: a schema using them goes to llguidance, which
# enforces them or refuses the schema.
_UNENFORCED = frozenset({"not", "if", "then", "else", "contains", "minContains", "maxContains",
                         "uniqueItems", "dependentSchemas", "unevaluatedProperties",
                         "unevaluatedItems"})
# Keywords whose value maps names (not keywords) to subschemas.
_SCHEMA_MAPS = frozenset({"properties", "patternProperties", "$defs", "definitions",
                          "dependentSchemas"})


def unenforced_keywords(schema: Any) -> list[str]:
    """The keywords of ``schema`` (at any depth) that xgrammar would silently ignore."""
    found: set[str] = set()
    stack = [schema]
    while stack:
        node = stack.pop()
        if isinstance(node, list):
            stack.extend(node)
            continue
        if not isinstance(node, dict):
            continue
        for key, value in node.items():
            if key in _UNENFORCED:
                found.add(key)
            if key == "allOf" and isinstance(value, list) and len(value) > 1:
                found.add("allOf")
            if key in _SCHEMA_MAPS and isinstance(value, dict):
                stack.extend(value.values())
            elif key not in ("enum", "const", "default", "examples"):
                stack.append(value)
    return sorted(found)


def choice_grammar(choices: list[str]) -> str:
    """An EBNF grammar whose outputs are exactly the choices (JSON string literals are valid
    EBNF literals: their escapes carry any character)."""
    return "root ::= " + " | ".join(json.dumps(c) for c in choices)


class XgrammarBackend:
    """Compiles constraints for one tokenizer; thread-safe (xgrammar's compiler is)."""

    name = "xgrammar"

    def __init__(self, tokenizer: Any, vocab_size: int) -> None:
        info = xgr.TokenizerInfo.from_huggingface(tokenizer, vocab_size=vocab_size)
        # The caller caches compiled constraints; one thread each, since compiles run on the
        # caller's pool.
        self._compiler = xgr.GrammarCompiler(info, max_threads=1, cache_enabled=False)

    def compile(self, params: StructuredOutputsParams) -> CompiledConstraint:
        """Raises ``ValueError`` with xgrammar's reason where it refuses the constraint."""
        compiler = self._compiler
        if params.json is not None:
            unenforced = unenforced_keywords(json.loads(str(params.json)))
            if unenforced:
                raise ValueError(f"xgrammar does not enforce {', '.join(unenforced)}")
        try:
            if params.json is not None:
                compiled = compiler.compile_json_schema(
                    str(params.json), any_whitespace=not params.disable_any_whitespace)
            elif params.json_object:
                # An object, as OpenAI's json_object promises (xgrammar's built-in JSON grammar
                # takes any value).
                compiled = compiler.compile_json_schema(
                    '{"type": "object"}', any_whitespace=not params.disable_any_whitespace)
            elif params.regex is not None:
                compiled = compiler.compile_regex(params.regex)
            elif params.choice is not None:
                compiled = compiler.compile_grammar(choice_grammar(params.choice))
            else:
                compiled = compiler.compile_grammar(str(params.grammar))
        except (RuntimeError, ValueError, TypeError) as e:
            raise ValueError(_reason(e)) from None
        return CompiledConstraint(self.name, lambda: _Matcher(compiled))


def _reason(error: BaseException) -> str:
    """xgrammar's message without its source location prefix (``[time] file.cc:line: ``)."""
    text = str(error).strip()
    if text.startswith("["):
        head, sep, rest = text.partition(": ")
        if sep and ".cc:" in head:
            text = rest
    return text
