"""Incremental detokenization: text grows token by token, safe at UTF-8 and word-piece seams.

A token can end in the middle of a multi-byte character (byte-level BPE) or change how its
neighbour renders (SentencePiece's leading space). So each step decodes a short window of recent
tokens twice, with and without the newest ones, and emits the difference once it no longer ends
in an incomplete character. A few prompt tokens seed the window so the first output token
renders as it would after the prompt.
"""

from __future__ import annotations

from typing import cast

from transformers import PreTrainedTokenizerBase

_CONTEXT_TOKENS = 5
_INCOMPLETE = "\ufffd"


class IncrementalDetokenizer:
    """Turns a sequence's output tokens into text, one token at a time."""

    def __init__(self, tokenizer: PreTrainedTokenizerBase, prompt_token_ids: list[int],
                 skip_special_tokens: bool = True) -> None:
        self._tokenizer = tokenizer
        self._skip_special = skip_special_tokens
        self._tokens = list(prompt_token_ids[-_CONTEXT_TOKENS:])
        self._prefix_offset = 0
        self._read_offset = len(self._tokens)
        self.text = ""

    def _decode(self, tokens: list[int]) -> str:
        # A flat id list decodes to one string.
        return cast(str, self._tokenizer.decode(tokens, skip_special_tokens=self._skip_special))

    def append(self, token_id: int) -> str:
        """Adds a token; returns the text it completes (possibly empty), also added to ``text``."""
        self._tokens.append(token_id)
        prefix = self._decode(self._tokens[self._prefix_offset: self._read_offset])
        full = self._decode(self._tokens[self._prefix_offset:])
        if len(full) <= len(prefix) or full.endswith(_INCOMPLETE):
            return ""
        delta = full[len(prefix):]
        self._prefix_offset = self._read_offset
        self._read_offset = len(self._tokens)
        self.text += delta
        return delta

    def flush(self) -> str:
        """At the end of a sequence, emits whatever is held back (an incomplete character)."""
        prefix = self._decode(self._tokens[self._prefix_offset: self._read_offset])
        full = self._decode(self._tokens[self._prefix_offset:])
        delta = full[len(prefix):] if len(full) > len(prefix) else ""
        self._prefix_offset = self._read_offset = len(self._tokens)
        self.text += delta
        return delta
