"""Where ``serve`` and ``triton`` find the model repository when none is given."""

from __future__ import annotations

import sys
import sysconfig
from pathlib import Path

import pytest

from pagedserve.repository import default
from pagedserve.repository.default import INSTALLED, default_repository


@pytest.fixture
def places(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> dict[str, Path]:
    """A checkout, a default-scheme and a user-scheme data folder and a prefix, none holding
    a repository yet."""
    roots = {name: tmp_path / name for name in ("checkout", "data", "user", "prefix")}
    schemes = {None: roots["data"], "posix_user": roots["user"], "nt_user": roots["user"]}
    monkeypatch.setattr(default, "CHECKOUT", roots["checkout"] / "model_repository")
    monkeypatch.setattr(sysconfig, "get_path",
                        lambda name, scheme=None: str(schemes[scheme]) if name == "data" else "")
    monkeypatch.setattr(sys, "prefix", str(roots["prefix"]))
    return {"checkout": roots["checkout"] / "model_repository",
            **{name: roots[name] / INSTALLED for name in ("data", "user", "prefix")}}


def test_lookup_order(places: dict[str, Path]) -> None:
    order = ["checkout", "data", "user", "prefix"]
    for place in order:
        places[place].mkdir(parents=True)
    for place in order:  # each wins once those before it are gone
        assert default_repository() == places[place]
        places[place].rmdir()


def test_nothing_found_names_every_place(places: dict[str, Path]) -> None:
    with pytest.raises(ValueError, match="--model-repository") as error:
        default_repository()
    for place in places.values():
        assert str(place) in str(error.value)


def test_same_data_folder_is_looked_at_once(places: dict[str, Path],
                                           monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(sys, "prefix", str(places["data"].parents[2]))
    assert default.candidates() == [places["checkout"], places["data"], places["user"]]
