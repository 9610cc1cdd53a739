"""JSON read from a model file: bounded in size, and a key stated twice is refused (``json``
would keep the last one silently)."""

from __future__ import annotations

import json
from typing import Any

from pagedserve.model.file_checks import ModelFileError


def _unique(pairs: list[tuple[str, Any]]) -> dict[str, Any]:
    result: dict[str, Any] = {}
    for key, value in pairs:
        if key in result:
            raise ValueError(f"key {key!r} appears twice")
        result[key] = value
    return result


def parse_object(text: bytes, what: str) -> dict[str, Any]:
    """``text`` as a JSON object; :class:`ModelFileError` naming ``what`` otherwise."""
    try:
        value = json.loads(text, object_pairs_hook=_unique)
    except (ValueError, RecursionError) as exc:
        raise ModelFileError(f"{what} is not valid JSON: {str(exc)[:200]}") from None
    if not isinstance(value, dict):
        raise ModelFileError(f"{what} is not a JSON object")
    return value
