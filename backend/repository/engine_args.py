"""Engine settings of a model version, from ``<version>/model.json`` and config ``parameters``.

The format is that of Triton's vLLM backend: ``model.json`` holds vLLM ``AsyncEngineArgs``
keyword arguments. The keys pagedserve understands map onto ``EngineConfig``; keys that only
matter to vLLM are ignored with a warning, so an existing vLLM-backend repository loads with at
most its ``model`` path changed. Config ``parameters`` with the same names (string values, as
Triton stores them) apply first; ``model.json`` overrides them.

Values are checked strictly (types, ranges, the device's memory for the KV cache) before any
weights load, and errors name the setting as it was written. ``model`` paths stay inside the
model's folder when relative; an absolute one is the operator's choice on disk but, arriving in a
client's ``config`` override, must lie inside the repository.
"""

from __future__ import annotations

import dataclasses
import json
import logging
from pathlib import Path
from typing import Any

import grpc
import torch

from pagedserve.config import EngineConfig
from pagedserve.model.runner import check_kv_cache_bytes
from pagedserve.protocol import model_config_pb2 as mc
from pagedserve.repository.errors import RepositoryError
from pagedserve.repository.names import shown
from pagedserve.repository.paths import is_within

log = logging.getLogger(__name__)

# vLLM / model.json name -> EngineConfig field.
_RENAMES = {
    "kv_cache_memory_bytes": "kv_cache_bytes",
}
# vLLM dtype spellings -> EngineConfig dtypes ("auto" keeps the engine's default).
_DTYPES = {"auto": None, "float": "float32", "float32": "float32", "half": "float16",
           "float16": "float16", "bfloat16": "bfloat16"}
# Parallelism we cannot provide: > 1 is an error rather than a silent single-device run.
_PARALLEL = ("pipeline_parallel_size",)
# Config parameters of the vLLM backend itself (not engine args): ignored quietly.
_BACKEND_PARAMETERS = {"REPORT_CUSTOM_METRICS", "ENABLE_VLLM_HEALTH_CHECK"}
DEFAULT_MODEL_NAMES = ("default", "")


def _fields() -> dict[str, dataclasses.Field[Any]]:
    return {f.name: f for f in dataclasses.fields(EngineConfig)}


def _type_error(name: str, base: str, value: Any) -> RepositoryError:
    quoted = f"'{shown(value)}'" if isinstance(value, str) else shown(repr(value))
    return RepositoryError(grpc.StatusCode.INVALID_ARGUMENT,
                           f"engine setting '{name}' must be of type {base}, got {quoted}")


def _coerce(name: str, value: Any, annotation: str) -> Any:
    """``value`` as the field's type: strings (config parameters, vLLM-style quoted numbers)
    are parsed; other values must already have the type (a JSON 1.5 or true is no int)."""
    base = annotation.replace(" | None", "").strip()
    if isinstance(value, str):
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
            raise _type_error(name, base, value) from None
        return value
    exact = not isinstance(value, bool) or base == "bool"
    fits = {"bool": isinstance(value, bool), "int": isinstance(value, int) and exact,
            "float": isinstance(value, int | float) and exact, "str": False}
    if not fits.get(base, True):
        raise _type_error(name, base, value)
    return value


def read_model_json(version_dir: Path) -> dict[str, Any]:
    """The ``model.json`` of a version folder, or ``{}`` if it has none.

    It must lie in the model's folder (a symlink out of it is refused); errors name it relative
    to the model.
    """
    path = version_dir / "model.json"
    if not path.is_file():
        return {}
    where = f"{version_dir.name}/model.json"
    if not is_within(path, version_dir.parent):
        raise RepositoryError(grpc.StatusCode.INVALID_ARGUMENT,
                              f"{where} of model '{version_dir.parent.name}' resolves outside "
                              "the model's folder")
    try:
        values = json.loads(path.read_text(encoding="utf-8"))
    except ValueError as e:  # JSONDecodeError, UnicodeDecodeError
        raise RepositoryError(grpc.StatusCode.INVALID_ARGUMENT,
                              f"failed to parse {where}: {e}") from None
    if not isinstance(values, dict):
        raise RepositoryError(grpc.StatusCode.INVALID_ARGUMENT,
                              f"{where} must hold a JSON object")
    return values


def engine_config(config: mc.ModelConfig, version_dir: Path,
                  client_root: Path | None = None) -> EngineConfig:
    """Builds the ``EngineConfig`` of one version; errors name the offending setting.

    ``client_root`` is set when ``config`` came from a client (RepositoryModelLoad's ``config``
    override) rather than from disk: a ``model`` path among its parameters must then resolve
    inside ``client_root``, the repository.
    """
    fields = _fields()
    from_client = client_root is not None
    # key -> (value, whether a client wrote it)
    settings: dict[str, tuple[Any, bool]] = {}
    for key, param in config.parameters.items():
        target = _RENAMES.get(key, key)
        if target in fields or key in _PARALLEL or key == "dtype":
            settings[key] = (param.string_value, from_client)
            if key == "model" and from_client:  # refused even where model.json overrides it
                _model_path(param.string_value, version_dir, client_root)
        elif key not in _BACKEND_PARAMETERS:
            log.debug("config parameter '%s' is not an engine setting", shown(key))
    settings.update((k, (v, False)) for k, v in read_model_json(version_dir).items())

    kwargs: dict[str, Any] = {}
    written_as: dict[str, str] = {}  # EngineConfig field -> the key that set it
    for key, (value, by_client) in settings.items():
        if key in _PARALLEL:
            if _coerce(key, value, "int") > 1:
                raise RepositoryError(grpc.StatusCode.INVALID_ARGUMENT,
                                      f"{key}={shown(str(value))} is not supported: pagedserve "
                                      "splits a model by tensor parallelism only "
                                      "(tensor_parallel_size)")
            continue
        if key == "model":
            kwargs["model"] = _model_path(value, version_dir,
                                          client_root if by_client else None)
            continue
        if key == "dtype":
            if not isinstance(value, str) or value not in _DTYPES:
                raise RepositoryError(grpc.StatusCode.INVALID_ARGUMENT,
                                      f"engine setting 'dtype' must be one of "
                                      f"{sorted(_DTYPES)}, got {shown(repr(value))}")
            if _DTYPES[value] is not None:
                kwargs["dtype"] = _DTYPES[value]
            continue
        if key == "device" and value == "auto":  # vLLM's default: the accelerator if any
            kwargs["device"] = "cuda" if torch.cuda.is_available() else "cpu"
            continue
        if key == "speculative_config" and isinstance(value, str):  # a config parameter
            try:
                value = json.loads(value)
            except ValueError:
                raise _type_error(key, "JSON object", value) from None
        target = _RENAMES.get(key, key)
        if target not in fields:
            log.warning("model '%s': ignoring engine setting '%s' (not used by pagedserve)",
                        config.name, shown(key))
            continue
        kwargs[target] = _coerce(key, value, str(fields[target].type))
        written_as[target] = key
    try:
        engine = EngineConfig(**kwargs)
        if "gpu_memory_utilization" in written_as and not engine.device.startswith("cuda"):
            # A share of a GPU's total memory: on a CPU it would silently change nothing.
            log.warning("model '%s': %s applies to CUDA devices only; on the CPU the KV cache "
                        "takes kv_cache_memory_fraction (%s) of the memory free after the "
                        "weights load", config.name, written_as["gpu_memory_utilization"],
                        engine.kv_cache_memory_fraction)
        per_device = engine.kv_cache_bytes_per_device
        if per_device is not None:  # refused here, before any weights load
            setting = written_as.get("kv_cache_bytes", "kv_cache_bytes")
            if per_device != engine.kv_cache_bytes:
                holder = "a rank" if engine.device.startswith("cuda") else "this node"
                setting = f"{holder}'s share of {setting}"
            check_kv_cache_bytes(per_device, engine.device, setting)
    except (TypeError, ValueError) as e:
        message = str(e)
        for target, key in written_as.items():  # name the setting as the config wrote it
            if key != target and message.startswith(target + " "):
                message = key + message[len(target):]
        raise RepositoryError(grpc.StatusCode.INVALID_ARGUMENT,
                              f"invalid engine settings for model '{config.name}': {message}"
                              ) from None
    return engine


def check_kv_cache_total(name: str, configs: list[EngineConfig]) -> None:
    """The versions of one model run side by side: their KV caches must fit together too."""
    sized = [c.kv_cache_bytes_per_device for c in configs
             if c.kv_cache_bytes_per_device is not None]
    if len(sized) < 2:
        return
    try:
        check_kv_cache_bytes(sum(sized), configs[0].device,
                             f"kv_cache_bytes of its {len(sized)} versions together")
    except ValueError as e:
        raise RepositoryError(grpc.StatusCode.INVALID_ARGUMENT,
                              f"invalid engine settings for model '{name}': {e}") from None


def _model_path(value: Any, version_dir: Path, client_root: Path | None) -> str | None:
    """Where the weights are: ``"default"`` or empty selects the embedded model.

    A relative path is taken from the version folder and must stay inside the model's folder.
    An absolute path is the operator's choice on disk; from a client (``client_root`` set) it
    must lie inside the repository. Refusals name the setting, never a path.
    """
    if not isinstance(value, str):
        raise _type_error("model", "str", value)
    if value in DEFAULT_MODEL_NAMES:
        return None
    model_dir = version_dir.parent
    if client_root is None and value.startswith("~"):
        return value  # the operator's home-relative path (the loader expands it)
    path = Path(value)
    if path.is_absolute():
        if client_root is None:
            return value
        if not is_within(path, client_root):
            raise RepositoryError(grpc.StatusCode.INVALID_ARGUMENT,
                                  "parameter 'model' of the 'config' override must name a path "
                                  "inside the model repository")
        return str(path.resolve())
    full = version_dir / path
    if not is_within(full, model_dir):
        source = ("parameter 'model' of the 'config' override" if client_root is not None
                  else "engine setting 'model'")
        raise RepositoryError(grpc.StatusCode.INVALID_ARGUMENT,
                              f"{source} of model '{model_dir.name}' must name a path inside "
                              "the model's folder (relative paths start at the version folder)")
    return str(full.resolve())
