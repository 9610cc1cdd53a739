"""The loaded adapters on the CPU: at most ``max_cpu_loras``, the least recently used dropped.

Keyed by the request's ``lora_int_id``, as vLLM's cache is. Reading an adapter takes file I/O
and checks, so it runs outside the lock: two adapters load side by side, and a lookup of an
adapter already held never waits for another's load. Concurrent requests for one id that is
not held share a single load (the first one in does it; the others wait on its entry).

An adapter refused (``LoRAError``) is remembered with the state of its files (sizes and times):
requests naming it again get the refusal without its files being read and checked again,
until they change.
"""

from __future__ import annotations

import os
import threading
from collections import OrderedDict
from collections.abc import Callable

from pagedserve.model.lora.adapter import CONFIG_FILE, WEIGHTS_FILE, LoRAAdapter, LoRAError

# (name, path) -> the adapter; raises (LoRAError) for one that cannot be served.
Loader = Callable[[str, str], LoRAAdapter]
# Refusals remembered, the most recent ones: a bound on what clients naming bad adapters cost.
MAX_REFUSALS = 64
FilesState = tuple[tuple[int, int] | None, ...]


def _files_state(path: str) -> FilesState:
    """(modification time, size) of the adapter folder and its two files, None where missing."""
    def state(p: str) -> tuple[int, int] | None:
        try:
            st = os.stat(p)
        except (OSError, ValueError):
            return None
        return st.st_mtime_ns, st.st_size

    return tuple(state(p) for p in (path, os.path.join(path, CONFIG_FILE),
                                    os.path.join(path, WEIGHTS_FILE)))


class _Entry:
    """An id's adapter, or its load in progress: ``done`` is set once ``adapter`` or
    ``error`` is."""

    def __init__(self, name: str, path: str) -> None:
        self.name = name
        self.path = path
        self.done = threading.Event()
        self.adapter: LoRAAdapter | None = None
        self.error: BaseException | None = None


class AdapterCache:
    """A thread-safe LRU of loaded adapters, by id."""

    def __init__(self, max_cpu_loras: int, loader: Loader) -> None:
        if max_cpu_loras < 1:
            raise ValueError(f"max_cpu_loras must be at least 1, got {max_cpu_loras}")
        self._loader = loader
        self._capacity = max_cpu_loras
        self._lock = threading.Lock()
        self._entries: OrderedDict[int, _Entry] = OrderedDict()  # least recently used first
        # (name, path) -> the files' state when refused, and the refusal's message.
        self._refused: OrderedDict[tuple[str, str], tuple[FilesState, str]] = OrderedDict()

    def get(self, lora_id: int, name: str, path: str) -> LoRAAdapter:
        """The adapter ``lora_id`` names, loaded from ``path`` unless held. An id that now
        names another name or path (an adapter replaced under its id) is loaded again. A
        failed load raises its error to every caller waiting on it and is not kept, so a
        later call tries again."""
        files = _files_state(path)
        with self._lock:
            refused = self._refused.get((name, path))
            if refused is not None and refused[0] == files:
                raise LoRAError(refused[1])
            entry = self._entries.get(lora_id)
            loads = entry is None or (entry.name, entry.path) != (name, path)
            if loads:
                entry = _Entry(name, path)
                self._entries[lora_id] = entry
            self._entries.move_to_end(lora_id)
            self._evict()
        assert entry is not None
        if loads:
            self._load(lora_id, entry, files)
        else:
            entry.done.wait()
        if entry.error is not None:
            raise entry.error
        assert entry.adapter is not None
        return entry.adapter

    def _load(self, lora_id: int, entry: _Entry, files: FilesState) -> None:
        try:
            entry.adapter = self._loader(entry.name, entry.path)
        except BaseException as exc:
            entry.error = exc
            with self._lock:
                if self._entries.get(lora_id) is entry:
                    del self._entries[lora_id]
                if isinstance(exc, LoRAError):
                    self._refused[(entry.name, entry.path)] = (files, str(exc))
                    while len(self._refused) > MAX_REFUSALS:
                        self._refused.popitem(last=False)
        finally:
            entry.done.set()

    def _evict(self) -> None:
        """Drops the least recently used beyond capacity (under the lock). One still loading
        is dropped too: its waiters hold its entry and get its adapter all the same."""
        while len(self._entries) > self._capacity:
            self._entries.popitem(last=False)

    def discard(self, lora_id: int) -> None:
        """Forgets ``lora_id``'s adapter (an unloaded adapter's memory goes with it)."""
        with self._lock:
            self._entries.pop(lora_id, None)

    def ids(self) -> list[int]:
        """The ids held (or loading), least recently used first."""
        with self._lock:
            return list(self._entries)

    def __len__(self) -> int:
        with self._lock:
            return len(self._entries)
