"""vLLM's runtime LoRA routes: ``POST /v1/load_lora_adapter`` and ``/v1/unload_lora_adapter``.

Served only with ``--allow-runtime-lora-updating`` (vLLM's ``VLLM_ALLOW_RUNTIME_LORA_UPDATING``);
without it they are not found, as vLLM's. Answers are vLLM's (``OpenAIServingModels``): 200
with a plain-text ``Success: ...`` line, errors as the OpenAI error object with its statuses and
types. What is ours: the repository serves many models, so a load goes to the ready model that
has LoRA enabled, or, when several do, to the one ``base_model_name`` names (vLLM takes the
field from ``--lora-modules`` only); a ``lora_path`` must name a folder inside the model
repository (relative paths start at the repository), since a client chooses it; and adapter
names never equal a model's or another model's adapter.

An adapter goes into every ready version of its model, each engine reading and checking it
first (a bad adapter is refused, 400, with the engine's reason; vLLM's newer versions answer
500). It serves until it is unloaded or its model version unloads (a reload starts from
``multi_lora.json`` and ``--lora-modules`` again). ``load_inplace`` replaces an adapter of the
same name, under a new id, so nothing cached of the old one serves the new one.
"""

from __future__ import annotations

import asyncio
import json
import logging
from collections.abc import Callable, Iterable
from typing import Any

from aiohttp import web

from pagedserve.repository import ModelVersion
from pagedserve.repository.lora import (
    MAX_ADAPTERS,
    AdapterPathError,
    AdapterTable,
    confined_folder,
    name_problem,
)
from pagedserve.repository.names import model_names, shown
from pagedserve.server.http.context import HttpContext
from pagedserve.server.http.openai.serving import OpenAIError

log = logging.getLogger(__name__)

_INVALID = "InvalidUserInput"


def _text(message: str) -> web.Response:
    return web.Response(text=message, content_type="text/plain")


def lora_models(models: Iterable[ModelVersion]) -> dict[str, list[ModelVersion]]:
    """The LoRA-enabled models among ``models``, by name, with their versions."""
    found: dict[str, list[ModelVersion]] = {}
    for model in models:
        if model.loras is not None:
            found.setdefault(model.name, []).append(model)
    return found


class LoRARoutes:
    """The two routes, over the repository's ready models."""

    def __init__(self, context: HttpContext) -> None:
        self.context = context
        self._lock = asyncio.Lock()  # one change at a time: a check and its change are atomic

    def routes(self) -> Iterable[tuple[str, str, Callable[..., Any]]]:
        yield "POST", "/v1/load_lora_adapter", self.load
        yield "POST", "/v1/unload_lora_adapter", self.unload

    @staticmethod
    async def _body(request: web.Request) -> dict[str, Any]:
        try:
            body = json.loads(await request.read() or b"{}")
        except (ValueError, RecursionError):
            raise OpenAIError(400, "the request body is not valid JSON", kind=_INVALID) from None
        if not isinstance(body, dict):
            raise OpenAIError(400, "the request body must be a JSON object", kind=_INVALID)
        for key in ("lora_name", "lora_path", "base_model_name"):
            if body.get(key) is not None and not isinstance(body[key], str):
                raise OpenAIError(400, f"'{key}' must be a string", key, _INVALID)
        if not isinstance(body.get("load_inplace", False), bool):
            raise OpenAIError(400, "'load_inplace' must be a boolean", "load_inplace", _INVALID)
        return body

    async def load(self, request: web.Request) -> web.Response:
        try:
            body = await self._body(request)
            async with self._lock:
                return await self._load(body)
        except OpenAIError as e:
            return e.response()

    async def unload(self, request: web.Request) -> web.Response:
        try:
            body = await self._body(request)
            async with self._lock:
                return self._unload(body)
        except OpenAIError as e:
            return e.response()

    def _target(self, base: str | None) -> list[ModelVersion]:
        """The ready versions of the model a load goes to."""
        repository = self.context.repository
        if base is not None:
            ready = repository.ready_versions(base)
            if not ready:
                raise OpenAIError(404, f"The model `{shown(base)}` does not exist.",
                                  "base_model_name", "NotFoundError")
            versions = [v for v in ready if v.loras is not None]
            if not versions:
                raise OpenAIError(400, f"LoRA is not enabled on model '{shown(base)}' (set "
                                       "\"enable_lora\": true in its model.json)",
                                  "base_model_name")
            return versions
        candidates = lora_models(repository.all_ready())
        if not candidates:
            raise OpenAIError(400, "no ready model has LoRA enabled (\"enable_lora\": true in "
                                   "its model.json)")
        if len(candidates) > 1:
            raise OpenAIError(400, f"models {', '.join(sorted(candidates))} have LoRA enabled: "
                                   "name the one to load into in 'base_model_name'",
                              "base_model_name")
        return next(iter(candidates.values()))

    async def _load(self, body: dict[str, Any]) -> web.Response:
        name, path = body.get("lora_name"), body.get("lora_path")
        if not name or not path:
            raise OpenAIError(400, "Both 'lora_name' and 'lora_path' must be provided.",
                              kind=_INVALID)
        problem = name_problem(name)
        if problem is not None:
            raise OpenAIError(400, f"'lora_name' {problem}", "lora_name", _INVALID)
        repository = self.context.repository
        if name in model_names(repository.root):
            raise OpenAIError(400, f"The lora adapter '{shown(name)}' is named like a model of "
                                   "the repository.", "lora_name", _INVALID)
        versions = self._target(body.get("base_model_name"))
        model = versions[0].name
        holder = repository.adapter_holder(name, excluding=model)
        if holder is not None:
            raise OpenAIError(400, f"The lora adapter '{shown(name)}' is served by model "
                                   f"'{holder}' already.", "lora_name", _INVALID)
        if any(name not in _table(v) and len(_table(v)) >= MAX_ADAPTERS for v in versions):
            raise OpenAIError(400, f"Model '{model}' serves {MAX_ADAPTERS} LoRA adapters "
                                   "already, the most it takes.", kind=_INVALID)
        if not body.get("load_inplace") and any(name in _table(v) for v in versions):
            raise OpenAIError(400, f"The lora adapter '{shown(name)}' has already been loaded. "
                                   "If you want to load the adapter in place, set "
                                   "'load_inplace' to True.", kind=_INVALID)
        folder = self._folder(name, path)
        # Each engine reads and checks it before any table names it: all or nothing.
        candidates = [(v, _table(v).new(name, folder)) for v in versions]
        for version, candidate in candidates:
            try:
                await asyncio.to_thread(version.engine.core.load_lora, candidate)
            except ValueError as e:  # LoRAError: names the adapter and the field, no path
                raise OpenAIError(400, str(e), kind="BadRequestError") from None
            except Exception as e:
                log.exception("loading LoRA adapter '%s' failed", shown(name))
                raise OpenAIError(500, f"Loading lora {shown(name)} failed: "
                                       f"{type(e).__name__}") from None
        for version, candidate in candidates:
            _table(version).put(candidate)
        log.info("Loaded new LoRA adapter: name '%s' for model '%s'", shown(name), model)
        return _text(f"Success: LoRA adapter '{name}' added successfully.")

    def _folder(self, name: str, path: str) -> str:
        """The adapter folder a client's ``lora_path`` names, inside the repository."""
        root = self.context.repository.root
        try:
            return confined_folder(path, root, root, "'lora_path'")
        except AdapterPathError as e:
            if not e.missing:
                raise OpenAIError(400, e.message, "lora_path", _INVALID) from None
            # vLLM's LoRAAdapterNotFoundError, with the path as the client wrote it.
            raise OpenAIError(404, f"Loading lora {shown(name)} failed: No adapter found for "
                                   f"{shown(path, 256)}", kind="NotFoundError") from None

    def _unload(self, body: dict[str, Any]) -> web.Response:
        name = body.get("lora_name")
        if not name:
            raise OpenAIError(400, "'lora_name' needs to be provided to unload a LoRA adapter.",
                              kind=_INVALID)
        versions = [v for v in self.context.repository.all_ready()
                    if v.loras is not None and name in v.loras]
        if not versions:
            raise OpenAIError(404, f"The lora adapter '{shown(name)}' cannot be found.",
                              kind="NotFoundError")
        for version in versions:
            removed = _table(version).get(name)
            _table(version).remove(name)
            if removed is not None:  # its weights go too (requests running with it reread them)
                version.engine.core.unload_lora(removed.lora_int_id)
        log.info("Removed LoRA adapter: name '%s'", shown(name))
        return _text(f"Success: LoRA adapter '{name}' removed successfully.")


def _table(version: ModelVersion) -> AdapterTable:
    assert version.loras is not None
    return version.loras

