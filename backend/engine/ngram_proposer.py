"""Draft tokens by prompt lookup (vLLM's ``ngram`` speculative method): no draft model.

Text that quotes, edits or repeats its context (code, summaries, retrieval answers) often
continues as it went on after an earlier occurrence of its latest words. The proposer finds the
most recent earlier occurrence of a sequence's last n tokens, for the largest n from
``max_n`` down to ``min_n`` that occurs, and proposes the tokens that followed it there.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np


class NgramProposer:
    """Proposes up to ``k`` tokens for a token list by n-gram lookup in that list."""

    def __init__(self, min_n: int, max_n: int) -> None:
        if not 1 <= min_n <= max_n:
            raise ValueError(f"n-gram bounds must satisfy 1 <= min_n <= max_n, "
                             f"got min_n={min_n}, max_n={max_n}")
        self.min_n = min_n
        self.max_n = max_n

    def propose(self, token_ids: Sequence[int], k: int) -> list[int]:
        """The at most ``k`` tokens that followed the longest (up to ``max_n``) most recent
        earlier match of the list's suffix; empty without a match of ``min_n`` tokens."""
        total = len(token_ids)
        if k < 1 or total <= self.min_n:
            return []
        tokens = np.asarray(token_ids, dtype=np.int64)
        # Where earlier occurrences could end: a token like the last, with a token after it.
        ends = np.flatnonzero(tokens[:-1] == tokens[-1])
        if not ends.size:
            return []
        # Grow every candidate's match backwards, one token at a time, while it holds.
        lengths = np.ones(ends.size, dtype=np.int64)
        for j in range(1, min(self.max_n, total - 1)):
            growing = np.flatnonzero((lengths == j) & (ends >= j))
            if not growing.size:
                break
            same = tokens[ends[growing] - j] == tokens[total - 1 - j]
            lengths[growing[same]] += 1
        best = int(lengths.max())
        if best < self.min_n:
            return []
        start = int(ends[np.flatnonzero(lengths == best)[-1]]) + 1
        return [int(t) for t in tokens[start: start + k]]
