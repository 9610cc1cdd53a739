"""The grammar engines' common face: a compiled constraint and the matcher each sequence holds."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Protocol

import torch


class GrammarMatcher(Protocol):
    """Where one sequence's output stands in its grammar."""

    def accept(self, token: int) -> bool:
        """Advances past ``token``; False (state unchanged) if the grammar forbids it."""

    def fill_bitmask(self, bitmask: torch.Tensor, row: int) -> None:
        """Writes the tokens allowed next into row ``row`` of a packed ``int32`` bitmask
        (bit ``t % 32`` of word ``t // 32`` set: token ``t`` allowed)."""

    def rollback(self, num_tokens: int) -> None:
        """Undoes the last ``num_tokens`` accepted tokens."""

    def is_terminated(self) -> bool:
        """True once the grammar has ended (its end token accepted): nothing may follow."""


@dataclass(frozen=True)
class CompiledConstraint:
    """A constraint compiled against one tokenizer; ``new_matcher`` starts a sequence's
    matcher at the beginning of the output."""

    backend: str  # the grammar engine that compiled it: "xgrammar" or "guidance"
    new_matcher: Callable[[], GrammarMatcher]


def bitmask_words(vocab_size: int) -> int:
    """``int32`` words per row of a packed bitmask over ``vocab_size`` tokens."""
    return -(-vocab_size // 32)
