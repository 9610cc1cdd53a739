"""Containment of repository paths: what the loader reads must stay where it was found.

Every check resolves symlinks on both sides, so a link inside the repository that points out of
it counts as outside. The repository belongs to the operator; these checks keep a client (or a
stray link) from steering reads elsewhere, not the operator from organising their disk.
"""

from __future__ import annotations

import contextlib
from pathlib import Path

import grpc

from pagedserve.repository.errors import RepositoryError

# What stands in for the repository's location in messages that reach clients.
REPOSITORY_PLACEHOLDER = "<model repository>"


def is_within(path: Path, root: Path) -> bool:
    """Whether ``path``, every symlink resolved, is ``root`` or lies below it (also resolved)."""
    try:
        return path.resolve().is_relative_to(root.resolve())
    except (OSError, RuntimeError, ValueError):  # symlink loops, NUL bytes: never "inside"
        return False


def require_within(path: Path, root: Path, what: str, model: str) -> None:
    """Refuses ``path`` (called ``what`` in the message) when it resolves outside ``root``."""
    if not is_within(path, root):
        raise RepositoryError(grpc.StatusCode.INVALID_ARGUMENT,
                              f"{what} of model '{model}' resolves outside the model's folder")


def redact(text: str, root: Path) -> str:
    """``text`` with the repository's absolute location replaced (errors of the loader name
    files by absolute path; clients need not learn where the repository lives)."""
    spellings = {str(root.absolute())}
    with contextlib.suppress(OSError, RuntimeError):
        spellings.add(str(root.resolve()))
    for spelling in sorted(spellings, key=len, reverse=True):
        if spelling not in ("", "/"):
            text = text.replace(spelling, REPOSITORY_PLACEHOLDER)
    return text
