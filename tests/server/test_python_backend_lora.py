"""LoRA inside real Triton's Python backend, without Triton: the model reads its version's
``multi_lora.json`` as our server does, and ``execute`` answers a ``lora_name`` it does not
serve with the vLLM backend's text (INVALID_ARG) and hands a known one to the engine."""

from __future__ import annotations

import importlib
import json
import sys
import types
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from pagedserve.config import EngineConfig
from pagedserve.lora_request import LoRARequest
from pagedserve.python_backend.settings import engine_adapters
from pagedserve.repository import RepositoryError

INVALID_ARG = 3


class _TritonError:
    INVALID_ARG = INVALID_ARG

    def __init__(self, message: str, code: int = 0) -> None:
        self.message, self.code = message, code


class _Response:
    def __init__(self, error: Any = None, output_tensors: Any = None) -> None:
        self.error = error


class _Tensor:
    def __init__(self, array: np.ndarray) -> None:
        self._array = array

    def as_numpy(self) -> np.ndarray:
        return self._array


class _Sender:
    def __init__(self) -> None:
        self.sent: list[Any] = []

    def send(self, response: Any, flags: int = 0) -> None:
        self.sent.append(response)


class _Request:
    def __init__(self, sampling: dict[str, Any]) -> None:
        self.inputs = {"text_input": np.array([b"Hi"], dtype=np.object_),
                       "sampling_parameters": np.array([json.dumps(sampling).encode()],
                                                       dtype=np.object_)}
        self.sender = _Sender()

    def get_response_sender(self) -> _Sender:
        return self.sender

    def parameters(self) -> str:
        return "{}"

    def requested_output_names(self) -> list[str]:
        return []


@pytest.fixture
def module(monkeypatch: pytest.MonkeyPatch) -> Any:
    fake = types.ModuleType("triton_python_backend_utils")
    fake.TRITONSERVER_RESPONSE_COMPLETE_FINAL = 1  # type: ignore[attr-defined]
    fake.TritonError = _TritonError  # type: ignore[attr-defined]
    fake.InferenceResponse = _Response  # type: ignore[attr-defined]
    fake.get_input_tensor_by_name = (  # type: ignore[attr-defined]
        lambda request, name: _Tensor(request.inputs[name]) if name in request.inputs
        else None)
    monkeypatch.setitem(sys.modules, "triton_python_backend_utils", fake)
    monkeypatch.delitem(sys.modules, "pagedserve.python_backend.model", raising=False)
    return importlib.import_module("pagedserve.python_backend.model")


def _args(root: Path, multi_lora: dict[str, str] | None) -> dict[str, str]:
    version = root / "m" / "1"
    (version / "a").mkdir(parents=True)
    if multi_lora is not None:
        (version / "multi_lora.json").write_text(json.dumps(multi_lora))
    return {"model_repository": str(root / "m"), "model_version": "1", "model_name": "m"}


def test_the_model_reads_multi_lora_json_as_our_server(tmp_path: Path) -> None:
    args = _args(tmp_path, {"sql": "a"})
    table = engine_adapters(args, EngineConfig(enable_lora=True))
    assert table is not None
    assert table.get("sql") == LoRARequest("sql", 1, str((tmp_path / "m/1/a").resolve()))
    with pytest.raises(RepositoryError, match="but LoRA is not enabled"):
        engine_adapters(args, EngineConfig())


def test_execute_answers_lora_names_as_the_vllm_backend(module: Any, tmp_path: Path) -> None:
    instance = module.TritonPythonModel()
    instance._loras = engine_adapters(_args(tmp_path, {"sql": "a"}),
                                      EngineConfig(enable_lora=True))
    instance.engine = types.SimpleNamespace(limits=None)
    spawned: list[Any] = []
    instance._loop = types.SimpleNamespace(loop=types.SimpleNamespace(
        call_soon_threadsafe=lambda _, *args: spawned.append(args)))
    unknown, known = _Request({"lora_name": "cow"}), _Request({"lora_name": "sql"})
    instance.execute([unknown, known])
    (refusal,) = unknown.sender.sent
    assert refusal.error.code == INVALID_ARG
    assert refusal.error.message == "LoRA cow is not supported, we currently support ['sql']"
    ((generate, lora, _),) = spawned
    assert lora == instance._loras.get("sql") and generate.lora_name == "sql"
    instance._loras = None
    off = _Request({"lora_name": "sql"})
    instance.execute([off])
    assert off.sender.sent[0].error.message == "LoRA feature is not enabled."
