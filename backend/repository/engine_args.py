"""Engine settings of a model version, from ``<version>/model.json`` and config ``parameters``.

The format is that of Triton's vLLM backend: ``model.json`` holds vLLM ``AsyncEngineArgs``
keyword arguments. The keys pagedserve understands map onto ``EngineConfig``; keys that only
matter to vLLM are ignored with a warning, so an existing vLLM-backend repository loads with at
most its ``model`` path changed. Config ``parameters`` with the same names (string values, as
Triton stores them) apply first; ``model.json`` overrides them.
"""

from __future__ import annotations

import dataclasses
import json
import logging
from pathlib import Path
from typing import Any

import grpc

from backend.config import EngineConfig
from backend.repository.errors import RepositoryError
from backend.server._proto import model_config_pb2 as mc

log = logging.getLogger(__name__)

# vLLM / model.json name -> EngineConfig field.
_RENAMES = {
    "gpu_memory_utilization": "kv_cache_memory_fraction",
    "kv_cache_memory_bytes": "kv_cache_bytes",
}
# vLLM dtype spellings -> EngineConfig dtypes ("auto" keeps the engine's default).
_DTYPES = {"auto": None, "float": "float32", "float32": "float32", "half": "float16",
           "float16": "float16", "bfloat16": "bfloat16"}
# Parallelism we cannot provide: > 1 is an error rather than a silent single-device run.
_PARALLEL = ("tensor_parallel_size", "pipeline_parallel_size")
# Config parameters of the vLLM backend itself (not engine args): ignored quietly.
_BACKEND_PARAMETERS = {"REPORT_CUSTOM_METRICS", "ENABLE_VLLM_HEALTH_CHECK"}
DEFAULT_MODEL_NAMES = ("default", "")


def _fields() -> dict[str, dataclasses.Field[Any]]:
    return {f.name: f for f in dataclasses.fields(EngineConfig)}


def _coerce(name: str, value: Any, annotation: str) -> Any:
    """Casts string values (config parameters, or vLLM-style quoted numbers) to the field type."""
    if not isinstance(value, str):
        return value
    base = annotation.replace(" | None", "").strip()
    try:
        if base == "bool":
            lowered = value.strip().lower()
            if lowered not in ("true", "false", "1", "0"):
                raise ValueError(value)
            return lowered in ("true", "1")
        if base == "int":
            return int(value)
        if base == "float":
            return float(value)
    except ValueError:
        raise RepositoryError(grpc.StatusCode.INVALID_ARGUMENT,
                              f"engine setting '{name}' must be of type {base}, got {value!r}"
                              ) from None
    return value


def read_model_json(version_dir: Path) -> dict[str, Any]:
    """The ``model.json`` of a version folder, or ``{}`` if it has none."""
    path = version_dir / "model.json"
    if not path.is_file():
        return {}
    try:
        values = json.loads(path.read_text())
    except json.JSONDecodeError as e:
        raise RepositoryError(grpc.StatusCode.INVALID_ARGUMENT,
                              f"failed to parse {path}: {e}") from None
    if not isinstance(values, dict):
        raise RepositoryError(grpc.StatusCode.INVALID_ARGUMENT,
                              f"{path} must hold a JSON object")
    return values


def engine_config(config: mc.ModelConfig, version_dir: Path) -> EngineConfig:
    """Builds the ``EngineConfig`` of one version; errors name the offending setting."""
    fields = _fields()
    settings: dict[str, Any] = {}
    for key, param in config.parameters.items():
        target = _RENAMES.get(key, key)
        if target in fields or key in _PARALLEL or key == "dtype":
            settings[key] = param.string_value
        elif key not in _BACKEND_PARAMETERS:
            log.debug("config parameter %r is not an engine setting", key)
    settings.update(read_model_json(version_dir))

    kwargs: dict[str, Any] = {}
    for key, value in settings.items():
        if key in _PARALLEL:
            if int(value) > 1:
                raise RepositoryError(grpc.StatusCode.INVALID_ARGUMENT,
                                      f"{key}={value} is not supported: pagedserve runs a model "
                                      "on one device")
            continue
        if key == "model":
            kwargs["model"] = _model_path(str(value), version_dir)
            continue
        if key == "dtype":
            if str(value) not in _DTYPES:
                raise RepositoryError(grpc.StatusCode.INVALID_ARGUMENT,
                                      f"engine setting 'dtype' must be one of "
                                      f"{sorted(_DTYPES)}, got {value!r}")
            if _DTYPES[str(value)] is not None:
                kwargs["dtype"] = _DTYPES[str(value)]
            continue
        target = _RENAMES.get(key, key)
        if target not in fields or target == "device":
            log.warning("model '%s': ignoring engine setting %r (not used by pagedserve)",
                        config.name, key)
            continue
        kwargs[target] = _coerce(key, value, str(fields[target].type))
    try:
        return EngineConfig(**kwargs)
    except (TypeError, ValueError) as e:
        raise RepositoryError(grpc.StatusCode.INVALID_ARGUMENT,
                              f"invalid engine settings for model '{config.name}': {e}") from None


def _model_path(value: str, version_dir: Path) -> str | None:
    """``"default"`` or empty selects the embedded model; relative paths are version-relative."""
    if value in DEFAULT_MODEL_NAMES:
        return None
    path = Path(value)
    if not path.is_absolute() and (version_dir / path).exists():
        return str(version_dir / path)
    return value
