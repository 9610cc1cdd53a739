"""A safetensors file's header, checked against the file before any tensor is read.

The format: an 8-byte little-endian header length, that many bytes of JSON naming each tensor's
dtype, shape and ``[begin, end)`` byte range in the data that follows. Each range must hold
exactly its shape's bytes, and the ranges must tile the data, one after another to its end (as
the safetensors library writes and requires them).
"""

from __future__ import annotations

import struct
from pathlib import Path
from typing import Any

from pagedserve.model.file_checks import ModelFileError
from pagedserve.model.file_checks.json_object import parse_object

# The safetensors library's own limit on a header.
MAX_HEADER_BYTES = 100_000_000
MAX_DIMS = 8  # far beyond any weight's; a list of thousands would only cost time
_ITEM_BYTES = {"BOOL": 1, "U8": 1, "I8": 1, "F8_E5M2": 1, "F8_E4M3": 1, "I16": 2, "U16": 2,
               "F16": 2, "BF16": 2, "I32": 4, "U32": 4, "F32": 4, "F64": 8, "I64": 8, "U64": 8}


def _is_count(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool) and value >= 0


FLOAT_DTYPES = ("F16", "BF16", "F32", "F64")


def tensor_shapes(path: Path) -> dict[str, tuple[str, tuple[int, ...]]]:
    """Each tensor's dtype and shape as ``path``'s header states them, once the header is
    found true."""
    with open(path, "rb") as f:
        size = f.seek(0, 2)
        f.seek(0)
        if size < 8:
            raise ModelFileError(f"{path.name}: {size} bytes is too short for a safetensors "
                                 f"file")
        (length,) = struct.unpack("<Q", f.read(8))
        if length > min(size - 8, MAX_HEADER_BYTES):
            raise ModelFileError(f"{path.name}: its header length {length} is over the "
                                 f"{min(size - 8, MAX_HEADER_BYTES)} bytes it can have")
        header = parse_object(f.read(length), f"{path.name}'s header")
    data_size = size - 8 - length
    shapes: dict[str, tuple[str, tuple[int, ...]]] = {}
    ranges: list[tuple[int, int, str]] = []
    for name, entry in header.items():
        if name == "__metadata__":
            continue
        if not isinstance(entry, dict):
            raise ModelFileError(f"{path.name}: tensor {name[:80]!r} is not described by an "
                                 f"object")
        dtype, shape, offsets = entry.get("dtype"), entry.get("shape"), entry.get("data_offsets")
        if dtype not in _ITEM_BYTES:
            raise ModelFileError(f"{path.name}: tensor {name[:80]!r} has unknown dtype "
                                 f"{str(dtype)[:40]!r}")
        if not isinstance(shape, list) or len(shape) > MAX_DIMS or \
                not all(_is_count(d) for d in shape):
            raise ModelFileError(f"{path.name}: tensor {name[:80]!r} has shape "
                                 f"{str(shape)[:80]}, not a list of sizes")
        if not (isinstance(offsets, list) and len(offsets) == 2 and all(map(_is_count, offsets))
                and offsets[0] <= offsets[1] <= data_size):
            raise ModelFileError(f"{path.name}: tensor {name[:80]!r} has data_offsets "
                                 f"{str(offsets)[:80]} outside the {data_size} bytes of data")
        elements = 1
        for d in shape:  # stopped once past the data: no product of huge numbers is formed
            elements *= d
            if elements * _ITEM_BYTES[dtype] > data_size:
                break
        if elements * _ITEM_BYTES[dtype] != offsets[1] - offsets[0]:
            raise ModelFileError(f"{path.name}: tensor {name[:80]!r} of shape {shape} and dtype "
                                 f"{dtype} takes {elements * _ITEM_BYTES[dtype]} bytes, not the "
                                 f"{offsets[1] - offsets[0]} its data_offsets give")
        shapes[name] = (dtype, tuple(shape))
        ranges.append((offsets[0], offsets[1], name))
    ranges.sort()
    end = 0
    for begin, stop, name in ranges:
        if begin != end:
            raise ModelFileError(f"{path.name}: the data of tensor {name[:80]!r} begins at byte "
                                 f"{begin}, not where the tensor before it ends ({end})")
        end = stop
    if end != data_size:
        raise ModelFileError(f"{path.name}: the tensors' data ends at byte {end} of the "
                             f"{data_size} that follow the header")
    return shapes
