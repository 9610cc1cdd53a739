"""The one error type of the repository, carrying the gRPC status it maps to.

What a client reads of it (``message``) is bounded: a garbage file's parse error quotes a short
excerpt of it, not the file (a long message would not even fit gRPC's metadata); the whole text
stays in the exception for the server's log. Text that comes from the server's side of a load
(a loader's exception) passes ``hide_paths`` first, so no server path reaches a client.
"""

from __future__ import annotations

import re

import grpc

MAX_MESSAGE_CHARS = 1024
# An absolute POSIX path: a slash that starts a word (not "1/2"), then path characters.
_ABSOLUTE_PATH = re.compile(r"(?<![\w.~<>])/[\w.@+~-]+(?:/[\w.@+~-]*)*")


def hide_paths(text: str) -> str:
    """``text`` with every absolute path read as ``<path>``."""
    return _ABSOLUTE_PATH.sub("<path>", text)


def bounded(text: str) -> str:
    """``text`` cut to ``MAX_MESSAGE_CHARS`` characters, saying how much was cut."""
    if len(text) <= MAX_MESSAGE_CHARS:
        return text
    cut = len(text) - MAX_MESSAGE_CHARS + 40
    return f"{text[:MAX_MESSAGE_CHARS - 40]}... ({cut} characters more)"


class RepositoryError(Exception):
    """A repository or lookup failure with Triton's status code and wording."""

    def __init__(self, code: grpc.StatusCode, message: str) -> None:
        super().__init__(message)
        self.code = code
        self.message = bounded(message)
