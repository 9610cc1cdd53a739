"""Structured outputs: constraints compiled off the step thread, one matcher per sequence, and a
bitmask per step that keeps each constrained row's logits to the tokens its grammar allows."""

from pagedserve.engine.structured_output.compiler import StructuredOutputCompiler
from pagedserve.engine.structured_output.matcher import CompiledConstraint, GrammarMatcher
from pagedserve.engine.structured_output.step_mask import grammar_bitmask

__all__ = ["CompiledConstraint", "GrammarMatcher", "StructuredOutputCompiler",
           "grammar_bitmask"]
