"""Model names: which strings name a model of the repository, and how names are quoted back.

A name is valid only if it is exactly one of the repository folder's own entries: a directory,
not hidden, whose real location (symlinks resolved) is inside the repository. The name is never
joined to a path before that match, so ``..``, absolute paths, ``a/b``, ``./a``, ``a/``, NUL
bytes, URL-encodings and look-alike characters are simply not found, like any missing model,
and nothing outside the repository is touched to decide it (CVE-2023-31036 is this class).
"""

from __future__ import annotations

import logging
import os
from pathlib import Path

from pagedserve.repository.paths import is_within

log = logging.getLogger(__name__)

# Longest name looked up (a file name's limit on common file systems); longer is not found.
MAX_NAME_BYTES = 255
# Characters of a client's string quoted back in messages.
SHOWN_CHARS = 64


def shown(text: str, limit: int = SHOWN_CHARS) -> str:
    """``text`` as messages quote it: at most ``limit`` characters, non-printable ones
    (control, format, bidi, lone surrogates) and backslashes escaped; plain names unchanged."""
    head = text[:limit]
    out = "".join(c if c.isprintable() and c != "\\" else
                  c.encode("unicode_escape", "backslashreplace").decode("ascii")
                  for c in head)
    return out + "..." if len(text) > limit else out


def _is_model_dir(root: Path, entry: str) -> bool:
    """Whether ``entry`` (a name listed in ``root``) is a model folder of the repository."""
    if entry.startswith("."):
        return False
    folder = root / entry
    return folder.is_dir() and is_within(folder, root)


def _entries(root: Path) -> list[str]:
    try:
        return os.listdir(root)
    except OSError:
        return []


def model_names(root: Path) -> list[str]:
    """Every model folder of the repository at ``root``, sorted."""
    return sorted(e for e in _entries(root) if _is_model_dir(root, e))


def model_folder(root: Path, name: str) -> Path | None:
    """The folder of model ``name`` in the repository at ``root``, or ``None`` if ``name`` is
    not exactly the name of one of its model folders."""
    if not name or len(name.encode("utf-8", "surrogatepass")) > MAX_NAME_BYTES:
        return None
    if name not in _entries(root):
        return None
    if not _is_model_dir(root, name):
        if (root / name).is_symlink():  # the operator should learn why their model is ignored
            log.warning("model folder '%s' is a symlink out of the repository: refused",
                        shown(name))
        return None
    return root / name
