"""Numbered version folders and the ``version_policy`` that picks which of them serve."""

from __future__ import annotations

from pathlib import Path

from pagedserve.protocol import model_config_pb2 as mc
from pagedserve.repository.paths import require_within


def available_versions(model_dir: Path) -> list[int]:
    """Version numbers found under ``model_dir``, ascending.

    As in Triton, sub-folders whose names are not numbers, or start with "0", are ignored. A
    version folder that resolves outside ``model_dir`` (a symlink out) is refused: the engine
    would read its ``model.json`` and weights from wherever it points.
    """
    versions = []
    for child in model_dir.iterdir():
        name = child.name
        # ASCII digits only: str.isdigit() also accepts digits of other scripts ("١", "²").
        if name.isascii() and name.isdigit() and not name.startswith("0") and child.is_dir():
            require_within(child, model_dir, f"version folder '{name}'", model_dir.name)
            versions.append(int(name))
    return sorted(versions)


def select_versions(policy: mc.ModelVersionPolicy, versions: list[int]) -> list[int]:
    """The versions ``policy`` serves out of ``versions`` (default: the latest one)."""
    choice = policy.WhichOneof("policy_choice")
    if choice == "all":
        return list(versions)
    if choice == "specific":
        wanted = set(policy.specific.versions)
        return [v for v in versions if v in wanted]
    count = policy.latest.num_versions if choice == "latest" else 1
    return versions[-max(count, 1):] if versions else []
