"""Where the ready-to-serve model repository lies: the checkout's, or the installed copy."""

from __future__ import annotations

import os
import sys
import sysconfig
from pathlib import Path

CHECKOUT = Path(__file__).resolve().parents[2] / "model_repository"
# Under a data folder: pyproject.toml's data files.
INSTALLED = Path("share") / "pagedserve" / "model_repository"


def candidates() -> list[Path]:
    """Where the repository may lie, in the order looked at: the checkout's, then the data
    folder of the default install scheme (Debian's system pip puts data under ``/usr/local``
    while ``sys.prefix`` is ``/usr``), of ``pip install --user``, and ``sys.prefix``."""
    places = [CHECKOUT]
    for data in (sysconfig.get_path("data"), sysconfig.get_path("data", f"{os.name}_user"),
                 sys.prefix):
        place = Path(data) / INSTALLED
        if place not in places:
            places.append(place)
    return places


def default_repository() -> Path:
    """The first of ``candidates()`` that exists; ``ValueError`` lists them all otherwise."""
    places = candidates()
    for place in places:
        if place.is_dir():
            return place
    raise ValueError("no model repository found (looked in "
                     f"{', '.join(str(p) for p in places)}): pass --model-repository")
