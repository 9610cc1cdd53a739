"""Compiles constraints off the step thread, caches them, and refuses the unusable ones.

vLLM's ``auto`` rule picks the engine: xgrammar first, llguidance where xgrammar refuses a JSON
schema or grammar (``disable_fallback`` keeps it to xgrammar). A compiled constraint is checked
to allow some first token, so an unsatisfiable one (an empty enum, contradictory bounds) is
refused with the request instead of masking every token of its first step. Compiles run on a
small pool of the compiler's own, so a slow one delays only the requests that wait on it.
"""

from __future__ import annotations

import copy
import threading
from collections import OrderedDict
from concurrent.futures import Future, ThreadPoolExecutor
from typing import Any, Protocol

import torch

from pagedserve.engine.structured_output.matcher import CompiledConstraint, bitmask_words
from pagedserve.structured_outputs import StructuredOutputsParams

# Distinct constraints kept compiled; a compiled JSON schema holds per-state token masks, so
# the cache is bounded by count.
CACHE_SIZE = 256
# A refusal quotes the grammar engines' reasons, which may quote the constraint: bounded.
MAX_REASON_CHARS = 512
# Compiles run side by side on this many threads: enough that one slow schema does not hold up
# every other constrained request, few enough to leave the cores to the steps.
COMPILE_THREADS = 2


class _Backend(Protocol):
    name: str

    def compile(self, params: StructuredOutputsParams) -> CompiledConstraint: ...


class StructuredOutputCompiler:
    """One model's constraint compiler: ``compile`` (blocking) or ``submit`` (a future); both
    raise or resolve to ``ValueError`` naming what is wrong with the constraint."""

    def __init__(self, tokenizer: Any, vocab_size: int) -> None:
        # Fast tokenizers are not safe to share across threads: the engines read their own.
        self._tokenizer = copy.deepcopy(tokenizer)
        self._vocab_size = vocab_size
        self._lock = threading.Lock()
        self._backends: dict[str, _Backend] = {}  # built on first use: xgrammar's reads the vocab
        self._cache: OrderedDict[tuple[Any, ...], CompiledConstraint] = OrderedDict()
        self._pool: ThreadPoolExecutor | None = None
        self._closed = False

    def submit(self, params: StructuredOutputsParams) -> Future[CompiledConstraint]:
        """Compiles on the compiler's threads; a cached constraint resolves at once."""
        cached = self._cached(params)
        if cached is not None:
            done: Future[CompiledConstraint] = Future()
            done.set_result(cached)
            return done
        with self._lock:
            if self._closed:
                raise RuntimeError("the structured-output compiler is shut down")
            if self._pool is None:
                self._pool = ThreadPoolExecutor(COMPILE_THREADS,
                                                thread_name_prefix="grammar-compile")
            return self._pool.submit(self.compile, params)

    def compile(self, params: StructuredOutputsParams) -> CompiledConstraint:
        cached = self._cached(params)
        if cached is not None:
            return cached
        compiled = self._compile(params)
        self._check_satisfiable(compiled, params)
        with self._lock:
            self._cache[params.key] = compiled
            while len(self._cache) > CACHE_SIZE:
                self._cache.popitem(last=False)
        return compiled

    def shutdown(self) -> None:
        """Stops the compile threads (a compile under way finishes first)."""
        with self._lock:
            self._closed = True
            pool, self._pool = self._pool, None
        if pool is not None:
            pool.shutdown(wait=True, cancel_futures=True)

    def _cached(self, params: StructuredOutputsParams) -> CompiledConstraint | None:
        with self._lock:
            found = self._cache.get(params.key)
            if found is not None:
                self._cache.move_to_end(params.key)
            return found

    def _backend(self, name: str) -> _Backend:
        with self._lock:
            backend = self._backends.get(name)
            if backend is None:
                # Imported here: a model that never sees a constraint never loads either.
                if name == "xgrammar":
                    from pagedserve.engine.structured_output.xgrammar_backend import (
                        XgrammarBackend,
                    )
                    backend = XgrammarBackend(self._tokenizer, self._vocab_size)
                else:
                    from pagedserve.engine.structured_output.guidance_backend import (
                        GuidanceBackend,
                    )
                    backend = GuidanceBackend(self._tokenizer, self._vocab_size)
                self._backends[name] = backend
            return backend

    def _compile(self, params: StructuredOutputsParams) -> CompiledConstraint:
        try:
            return self._backend("xgrammar").compile(params)
        except ValueError as refused:
            # A grammar in xgrammar's EBNF (it has ``::=`` rules) is not retried as Lark: the
            # Lark parser's complaint would only obscure xgrammar's.
            fallback = not params.disable_fallback and (
                params.kind == "json"
                or (params.kind == "grammar" and "::=" not in str(params.grammar)))
            if not fallback:
                raise ValueError(f"{params.label}: "
                                 f"{_bounded(str(refused))}") from None
            try:
                return self._backend("guidance").compile(params)
            except ValueError as also:
                raise ValueError(f"{params.label}: "
                                 f"{_bounded(str(refused))} (xgrammar); "
                                 f"{_bounded(str(also))} (llguidance)") from None

    def _check_satisfiable(self, compiled: CompiledConstraint,
                           params: StructuredOutputsParams) -> None:
        bitmask = torch.zeros(1, bitmask_words(self._vocab_size), dtype=torch.int32)
        compiled.new_matcher().fill_bitmask(bitmask, 0)
        if not bool(bitmask.any()):
            raise ValueError(f"{params.label}: no output can satisfy the "
                             "constraint")


def _bounded(reason: str) -> str:
    return reason if len(reason) <= MAX_REASON_CHARS else reason[:MAX_REASON_CHARS] + "..."
