"""``--lora-modules``: LoRA adapters the operator attaches to a LoRA-enabled model at start-up.

vLLM's flag and forms: ``name=path`` or the JSON object ``{"name": ..., "path": ...,
"base_model_name": ...}``, several per flag, the flag repeatable. vLLM serves one model; a
repository serves many, so an adapter goes to the model its ``base_model_name`` names, else to
the one loaded model that has LoRA enabled: when none or several do, the server does not start
(exit status 2) and says which to name. Paths are the operator's (like an absolute ``model`` in
``model.json``): any folder on disk, relative to the working directory. Each adapter is read and
checked by every ready version's engine before the server starts, and stays attached to its
model: every later load of the model serves it beside ``multi_lora.json``'s adapters.
"""

from __future__ import annotations

import asyncio
import json
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path

from pagedserve.repository import ModelRepository
from pagedserve.repository.lora import name_problem
from pagedserve.repository.names import shown

FLAG = "--lora-modules"


@dataclass(frozen=True)
class LoRAModule:
    """One adapter of the flag (vLLM's ``LoRAModulePath``)."""

    name: str
    path: str
    base_model_name: str | None = None


def parse_lora_modules(values: Iterable[str]) -> tuple[LoRAModule, ...]:
    """The flag's values as modules; ``ValueError`` naming the flag and the value otherwise."""
    modules: list[LoRAModule] = []
    for item in values:
        if not item:
            continue
        if "=" in item and "," not in item:  # vLLM's rule for the name=path form
            name, _, path = item.partition("=")
            module = LoRAModule(name, path)
        else:
            try:
                fields = json.loads(item)
            except ValueError:
                raise ValueError(f"Invalid JSON format for {FLAG}: {shown(item, 200)}") from None
            if not isinstance(fields, dict) or not {"name", "path"} <= set(fields) or \
                    not set(fields) <= {"name", "path", "base_model_name"} or \
                    not all(isinstance(v, str) for v in fields.values()):
                raise ValueError(f"Invalid fields for {FLAG}: {shown(item, 200)} (expected "
                                 "string fields name, path and optionally base_model_name)")
            module = LoRAModule(fields["name"], fields["path"], fields.get("base_model_name"))
        problem = name_problem(module.name)
        if problem is not None:
            raise ValueError(f"{FLAG}: adapter name '{shown(module.name)}' {problem}")
        if not module.path or not Path(module.path).expanduser().is_dir():
            raise ValueError(f"{FLAG}: adapter '{module.name}' names no folder "
                             f"('{shown(module.path, 200)}')")
        if any(m.name == module.name for m in modules):
            raise ValueError(f"{FLAG}: adapter '{module.name}' is given twice")
        modules.append(LoRAModule(module.name, str(Path(module.path).expanduser().resolve()),
                                  module.base_model_name))
    return tuple(modules)


def _target(repository: ModelRepository, module: LoRAModule) -> str:
    """The model ``module`` attaches to."""
    where = f"{FLAG}: adapter '{module.name}'"
    if module.base_model_name is not None:
        model = module.base_model_name
        if model not in repository.model_names():
            raise ValueError(f"{where}: base_model_name '{shown(model)}' is not a model of the "
                             "repository")
        ready = repository.ready_versions(model)
        if ready and all(v.loras is None for v in ready):
            raise ValueError(f"{where}: model '{model}' does not have LoRA enabled "
                             "(\"enable_lora\": true in its model.json)")
        return model
    enabled = sorted({m.name for m in repository.all_ready() if m.loras is not None})
    if not enabled:
        raise ValueError(f"{where}: no loaded model has LoRA enabled (\"enable_lora\": true in "
                         "its model.json); name the model with the JSON form's base_model_name")
    if len(enabled) > 1:
        raise ValueError(f"{where}: models {', '.join(enabled)} have LoRA enabled; name the "
                         "model of each adapter: {\"name\": ..., \"path\": ..., "
                         "\"base_model_name\": ...}")
    return enabled[0]


async def attach_lora_modules(repository: ModelRepository,
                              modules: Sequence[LoRAModule]) -> None:
    """Attaches ``modules`` to their models (after the start-up loads); ``ValueError`` naming
    the flag and the adapter when one cannot be served."""
    for module in modules:
        model = _target(repository, module)
        where = f"{FLAG}: adapter '{module.name}'"
        if module.name in repository.model_names():
            raise ValueError(f"{where} is named like a model of the repository")
        holder = repository.adapter_holder(module.name, excluding=model)
        if holder is not None:
            raise ValueError(f"{where} is served by model '{holder}' already")
        versions = [v for v in repository.ready_versions(model) if v.loras is not None]
        if any(module.name in v.loras for v in versions if v.loras is not None):
            raise ValueError(f"{where} is listed in the multi_lora.json of model '{model}' "
                             "already")
        for version in versions:
            assert version.loras is not None
            request = version.loras.new(module.name, module.path)
            try:
                await asyncio.to_thread(version.engine.core.load_lora, request)
            except ValueError as e:  # LoRAError: what is wrong with the adapter
                raise ValueError(f"{where}: {e}") from None
            version.loras.put(request)
        repository.lora_modules.setdefault(model, []).append((module.name, module.path))
