"""A step's grammar bitmask: one packed row per sampled row, filled by that row's matcher."""

from __future__ import annotations

import torch

from pagedserve.engine.structured_output.matcher import GrammarMatcher, bitmask_words


def grammar_bitmask(matchers: list[GrammarMatcher | None], ahead: list[list[int]],
                    vocab_size: int) -> torch.Tensor:
    """Row ``i`` allows the tokens ``matchers[i]`` allows once the tokens ``ahead[i]`` follow
    (a drafted row's earlier drafts, taken as accepted and rolled back after); rows without a
    matcher allow every token.

    A row whose drafts the grammar forbids allows every token: its pick is never used, since
    the row before it cannot pick the forbidden draft.
    """
    bitmask = torch.full((len(matchers), bitmask_words(vocab_size)), -1, dtype=torch.int32)
    for row, (matcher, tokens) in enumerate(zip(matchers, ahead)):
        if matcher is None:
            continue
        taken = 0
        for token in tokens:
            if not matcher.accept(token):
                break
            taken += 1
        if taken == len(tokens):
            matcher.fill_bitmask(bitmask, row)
        if taken:
            matcher.rollback(taken)
    return bitmask
