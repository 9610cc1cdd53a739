"""The GGUF conversion cache: a converted model is found by its source file's whole content.

A GGUF file's identity is the SHA-256 of its bytes (and the ``transformers`` version that
converts it), so a file of the same name and size whose bytes differ anywhere gets its own
conversion, and the same file installed elsewhere finds the earlier one. Reading a file whole
at every start would cost seconds, so each file's digest is remembered in the cache's index by
path, size and modification time and computed again only when one of those changes.

Each converted folder holds a manifest of its files (size, modification time, SHA-256) and of
its source's digest. A folder whose files no longer match it (edited, truncated, lost) is not
used: the model is converted again.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import logging
import os
import tempfile
from pathlib import Path
from typing import Any

log = logging.getLogger(__name__)

MANIFEST = "pagedserve-manifest.json"
_INDEX = "digests.json"
_CHUNK = 1 << 22


def _sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(_CHUNK):
            digest.update(chunk)
    return digest.hexdigest()


def _write_json(path: Path, value: Any) -> None:
    """Atomically: readers see the old file or the new one, never half of one."""
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}-")
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as f:
            json.dump(value, f)
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(OSError):
            os.unlink(tmp)
        raise


def _read_json(path: Path) -> dict[str, Any]:
    try:
        value = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return {}
    return value if isinstance(value, dict) else {}


def content_digest(source: Path, cache: Path) -> str:
    """The SHA-256 of ``source``'s bytes, remembered in ``cache`` by path, size and time."""
    stat = source.stat()
    key = str(source.resolve())
    index_path = cache / _INDEX
    known = _read_json(index_path).get(key)
    if (isinstance(known, dict) and known.get("size") == stat.st_size
            and known.get("mtime_ns") == stat.st_mtime_ns
            and isinstance(known.get("sha256"), str)):
        return str(known["sha256"])
    digest = _sha256(source)
    cache.mkdir(parents=True, exist_ok=True)
    index = _read_json(index_path)  # again: another process may have written it meanwhile
    index[key] = {"size": stat.st_size, "mtime_ns": stat.st_mtime_ns, "sha256": digest}
    _write_json(index_path, index)
    return digest


def write_manifest(folder: Path, source_digest: str) -> None:
    """Records ``folder``'s files and the source they were converted from."""
    files = {}
    for path in sorted(folder.iterdir()):
        if path.is_file() and path.name != MANIFEST:
            stat = path.stat()
            files[path.name] = {"size": stat.st_size, "mtime_ns": stat.st_mtime_ns,
                                "sha256": _sha256(path)}
    _write_json(folder / MANIFEST, {"source_sha256": source_digest, "files": files})


def is_intact(folder: Path, source_digest: str) -> bool:
    """Whether ``folder`` holds exactly what was converted from that source. A file whose size
    and time are as recorded is taken as it is; one whose time moved is read and compared."""
    manifest = _read_json(folder / MANIFEST)
    files = manifest.get("files")
    if manifest.get("source_sha256") != source_digest or not isinstance(files, dict):
        return False
    present = {p.name for p in folder.iterdir() if p.is_file() and p.name != MANIFEST}
    if present != set(files):
        return False
    for name, recorded in files.items():
        stat = (folder / name).stat()
        if stat.st_size != recorded.get("size"):
            return False
        if stat.st_mtime_ns != recorded.get("mtime_ns") and \
                _sha256(folder / name) != recorded.get("sha256"):
            return False
    return True
