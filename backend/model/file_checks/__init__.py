"""Model files are untrusted input: every size they claim is checked before anything is
allocated or converted.

A GGUF header, a safetensors header or a ``config.json`` can claim any count, length, shape or
offset; believed, one patched number (a block count of 100000) makes a load allocate without
bound. These checks walk the headers themselves, in time and memory bounded by the file's real
size, and hold what they claim against the file's size, against each other and against the
architecture's own shapes. A file that lies gets a :class:`ModelFileError` naming the field.
"""

from __future__ import annotations


class ModelFileError(ValueError):
    """A model file that is malformed or claims what it does not hold."""


# Far above any released model's context (the rotary tables are allocated at this length).
MAX_POSITIONS = 1 << 22
