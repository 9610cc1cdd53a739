"""The engine settings of a model inside Triton, from ``initialize``'s ``args`` (no Triton)."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest
import torch

from pagedserve.python_backend.settings import engine_settings, instance_device
from pagedserve.repository.errors import RepositoryError


def _args(root: Path, kind: str, device_id: str = "0", parameters: dict[str, str] | None = None,
          model_json: dict[str, Any] | None = None) -> dict[str, str]:
    (root / "m" / "1").mkdir(parents=True)
    (root / "m" / "1" / "model.json").write_text(json.dumps(model_json or {}))
    config = {"name": "m", "parameters": {k: {"string_value": v}
                                          for k, v in (parameters or {}).items()}}
    return {"model_config": json.dumps(config), "model_repository": str(root / "m"),
            "model_version": "1", "model_instance_kind": kind,
            "model_instance_device_id": device_id}


def test_instance_device() -> None:
    assert instance_device({"model_instance_kind": "GPU", "model_instance_device_id": "1"}) \
        == "cuda:1"
    assert instance_device({"model_instance_kind": "CPU", "model_instance_device_id": "0"}) \
        is None


def test_gpu_instance_runs_on_its_gpu(tmp_path: Path) -> None:
    args = _args(tmp_path, "GPU", "0")
    if torch.cuda.is_available():
        assert engine_settings(args).device == "cuda:0"
    else:  # the device Triton named is used, and checked like any other setting
        with pytest.raises(RepositoryError, match="device 'cuda:0' is not available"):
            engine_settings(args)


@pytest.mark.parametrize("where", ["parameters", "model_json"])
def test_an_explicit_device_wins(tmp_path: Path, where: str) -> None:
    args = (_args(tmp_path, "GPU", parameters={"device": "cpu"}) if where == "parameters"
            else _args(tmp_path, "GPU", model_json={"device": "cpu"}))
    assert engine_settings(args).device == "cpu"


def test_cpu_instance_keeps_the_default(tmp_path: Path) -> None:
    assert engine_settings(_args(tmp_path, "CPU")).device == "cpu"
