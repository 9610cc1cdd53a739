"""A model's engine settings inside Triton, read as our server reads them.

Triton hands ``initialize`` the model's configuration as JSON and the model's folder; the
settings come from the same places as for ``python -m pagedserve serve``: config ``parameters``
first, then ``<version>/model.json`` (``pagedserve.repository.engine_args``). Where neither names a
``device``, the engine runs where Triton placed the instance (``instance_group``'s kind and GPUs).
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from pagedserve.config import EngineConfig
from pagedserve.protocol import model_config_pb2 as mc
from pagedserve.repository.engine_args import engine_config
from pagedserve.repository.lora import AdapterTable, adapter_table


def config_parameters(model_config: dict[str, Any]) -> mc.ModelConfig:
    """The part of Triton's JSON model configuration the engine settings read: name and
    ``parameters`` (string values, as Triton stores them)."""
    config = mc.ModelConfig(name=str(model_config.get("name", "")))
    for key, value in (model_config.get("parameters") or {}).items():
        config.parameters[key].string_value = str(value.get("string_value", ""))
    return config


def instance_device(args: dict[str, str]) -> str | None:
    """The device of a ``KIND_GPU`` instance as ``EngineConfig`` names it (``cuda:N``); None for
    any other kind."""
    if args.get("model_instance_kind") != "GPU":
        return None
    return f"cuda:{int(args.get('model_instance_device_id') or 0)}"


def engine_settings(args: dict[str, str]) -> EngineConfig:
    """``EngineConfig`` of the model version ``initialize(args)`` is loading.

    Raises ``RepositoryError`` naming a bad setting, as our server does at load.
    """
    config = config_parameters(json.loads(args["model_config"]))
    device = instance_device(args)
    if device is not None and "device" not in config.parameters:
        # As a parameter: model.json overrides parameters, so its own device still wins.
        config.parameters["device"].string_value = device
    version_dir = Path(args["model_repository"]) / args["model_version"]
    return engine_config(config, version_dir)


def engine_adapters(args: dict[str, str], settings: EngineConfig) -> AdapterTable | None:
    """The LoRA adapters of the version ``initialize(args)`` is loading: its
    ``multi_lora.json``, checked as our server checks it (``RepositoryError``); None when its
    engine settings do not enable LoRA."""
    model_dir = Path(args["model_repository"])
    return adapter_table(settings, model_dir / args["model_version"], model_dir.parent,
                         args["model_name"])
