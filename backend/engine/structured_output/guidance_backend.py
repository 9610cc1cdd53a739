"""Constraints compiled by llguidance: the fallback where xgrammar refuses a schema or grammar,
as vLLM's ``auto`` falls back."""

from __future__ import annotations

from typing import Any

import llguidance
import llguidance.hf
import llguidance.torch
import torch

from pagedserve.engine.structured_output.matcher import CompiledConstraint
from pagedserve.engine.structured_output.xgrammar_backend import choice_grammar
from pagedserve.structured_outputs import StructuredOutputsParams


class _Matcher:
    def __init__(self, tokenizer: llguidance.LLTokenizer, grammar: str) -> None:
        self._matcher = llguidance.LLMatcher(tokenizer, grammar)

    def accept(self, token: int) -> bool:
        return bool(self._matcher.consume_token(token))

    def fill_bitmask(self, bitmask: torch.Tensor, row: int) -> None:
        llguidance.torch.fill_next_token_bitmask(self._matcher, bitmask, row)

    def rollback(self, num_tokens: int) -> None:
        self._matcher.rollback(num_tokens)

    def is_terminated(self) -> bool:
        return bool(self._matcher.is_stopped())


class GuidanceBackend:
    """Compiles constraints for one tokenizer with llguidance."""

    name = "guidance"

    def __init__(self, tokenizer: Any, vocab_size: int) -> None:
        self._tokenizer = llguidance.hf.from_tokenizer(tokenizer, n_vocab=vocab_size)

    def compile(self, params: StructuredOutputsParams) -> CompiledConstraint:
        """Raises ``ValueError`` with llguidance's reason where it refuses the constraint."""
        matcher = llguidance.LLMatcher
        try:
            if params.json is not None:
                grammar = matcher.grammar_from_json_schema(
                    str(params.json),
                    defaults={"whitespace_flexible": not params.disable_any_whitespace})
            elif params.json_object:
                grammar = matcher.grammar_from_json_schema(
                    '{"type": "object"}',
                    defaults={"whitespace_flexible": not params.disable_any_whitespace})
            elif params.regex is not None:
                grammar = matcher.grammar_from_regex(params.regex)
            elif params.choice is not None:
                grammar = matcher.grammar_from_lark(choice_grammar(params.choice)
                                                    .replace("root ::=", "start:", 1))
            else:
                grammar = matcher.grammar_from_lark(str(params.grammar))
        except (RuntimeError, ValueError, TypeError) as e:
            raise ValueError(str(e)) from None
        ok, problem = _validate(grammar, self._tokenizer)
        if not ok:
            raise ValueError(problem)
        tokenizer = self._tokenizer
        return CompiledConstraint(self.name, lambda: _Matcher(tokenizer, grammar))


def _validate(grammar: str, tokenizer: llguidance.LLTokenizer) -> tuple[bool, str]:
    is_error, messages = llguidance.LLMatcher.validate_grammar_with_warnings(grammar, tokenizer)
    return (not is_error, "; ".join(messages))
