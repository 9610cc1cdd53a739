"""Where the ready-to-serve model repository lies: the checkout's, or the installed copy."""

from __future__ import annotations

import sys
from pathlib import Path


def default_repository() -> Path:
    """``model_repository/`` of a source checkout; once installed, the copy the wheel put under
    ``<prefix>/share/pagedserve/model_repository`` (``pyproject.toml``'s data files)."""
    checkout = Path(__file__).resolve().parents[2] / "model_repository"
    if checkout.is_dir():
        return checkout
    return Path(sys.prefix) / "share" / "pagedserve" / "model_repository"
