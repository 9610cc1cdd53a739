"""The GGUF conversion cache recognises a file by its content, wherever it is installed."""

from __future__ import annotations

import shutil
from pathlib import Path

from pagedserve.model.loader import default_model_path, gguf_fingerprint


def test_a_copy_elsewhere_has_the_same_fingerprint(tmp_path: Path) -> None:
    original = Path(default_model_path())
    copy = tmp_path / "elsewhere" / original.name
    copy.parent.mkdir()
    shutil.copyfile(original, copy)  # a new path and new time stamps
    assert gguf_fingerprint(copy) == gguf_fingerprint(original)


def test_changed_content_changes_the_fingerprint(tmp_path: Path) -> None:
    original = Path(default_model_path())
    data = bytearray(original.read_bytes())
    fingerprints = {gguf_fingerprint(original)}
    # The header, the last byte and a sampled byte in the middle each change the digest.
    for offset in (100, len(data) - 1, len(data) // 17):
        changed = tmp_path / f"changed-{offset}.gguf"
        edited = bytearray(data)
        edited[offset] ^= 0xFF
        changed.write_bytes(edited)
        fingerprints.add(gguf_fingerprint(changed))
    assert len(fingerprints) == 4
