"""The model repository without engines: configs, versions, engine settings, control modes."""

from __future__ import annotations

import asyncio
import json
import os
import threading
from pathlib import Path
from typing import Any

import grpc
import pytest
import torch

from pagedserve.config import EngineConfig
from pagedserve.protocol import model_config_pb2 as mc
from pagedserve.repository import ModelRepository, RepositoryError
from pagedserve.repository.engine_args import engine_config
from pagedserve.repository.model_config import load_config, parse_config
from pagedserve.repository.versions import available_versions, select_versions
from tests.server.conftest import DEFAULT_REPOSITORY


class _StubEngine:
    def __init__(self, config: EngineConfig) -> None:
        self.config = config
        self.stopped = False
        self.stop_reason: str | None = None
        self.dead: str | None = None  # what failure() reports
        self.in_flight = 0  # requests an unload's drain waits for

    def shutdown(self, reason: str = "engine shut down") -> None:
        self.stopped = True
        self.stop_reason = reason

    def failure(self) -> str | None:
        return self.dead


def _stub_factory(config: EngineConfig, observers: Any = ()) -> tuple[Any, Any]:
    if config.seed == 666:
        raise RuntimeError("weights not found")
    return _StubEngine(config), None


def _model(root: Path, name: str, versions: list[int], config: str = 'backend: "vllm"',
           model_json: dict[str, Any] | None = None) -> Path:
    folder = root / name
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "config.pbtxt").write_text(config)
    for v in versions:
        (folder / str(v)).mkdir(exist_ok=True)
        (folder / str(v) / "model.json").write_text(json.dumps(model_json or {}))
    return folder


def test_versions_and_policies(tmp_path: Path) -> None:
    folder = _model(tmp_path, "m", [1, 2, 10])
    (folder / "03").mkdir()
    (folder / "latest").mkdir()
    (folder / "\u00b2").mkdir()  # "²".isdigit(), but no version number
    assert available_versions(folder) == [1, 2, 10]
    policy = mc.ModelVersionPolicy()
    assert select_versions(policy, [1, 2, 10]) == [10]
    policy.latest.num_versions = 2
    assert select_versions(policy, [1, 2, 10]) == [2, 10]
    policy.all.SetInParent()
    assert select_versions(policy, [1, 2, 10]) == [1, 2, 10]
    policy.specific.versions.extend([1, 7])
    assert select_versions(policy, [1, 2, 10]) == [1]


def test_default_repository_config_is_complete() -> None:
    config = load_config(DEFAULT_REPOSITORY / "smollm2")
    assert config.name == "smollm2" and config.backend == "pagedserve"
    assert config.model_transaction_policy.decoupled
    names = [i.name for i in config.input]
    assert names[:2] == ["text_input", "stream"] and "input_ids" in names
    assert len(names) == len(set(names))
    settings = engine_config(config, DEFAULT_REPOSITORY / "smollm2" / "1")
    assert settings.model is None and settings.max_model_len == 2048
    assert settings.kv_cache_bytes == 512 * 2**20


def test_bare_vllm_config_gets_the_backend_tensors() -> None:
    config = load_config(Path("/nonexistent/bare"), override='{"backend": "vllm"}')
    assert config.model_transaction_policy.decoupled and config.max_batch_size == 0
    assert {o.name for o in config.output} >= {"text_output", "finish_reason", "output_ids"}
    assert config.version_policy.latest.num_versions == 1


@pytest.mark.parametrize(("text", "message"), [
    ('name: "other"', "expecting 'bare'"),
    ('backend: "onnxruntime"', "unsupported backend"),
    ("max_batch_size: 8", "max_batch_size must be 0"),
    ("not a config {", "failed to parse"),
    ('input [{ name: "stream" data_type: TYPE_BOOL dims: [1] },'
     ' { name: "stream" data_type: TYPE_BOOL dims: [1] }]',
     "input 'stream' for model 'bare' is declared more than once in its configuration"),
    ('output [{ name: "x" data_type: TYPE_FP32 dims: [1] },'
     ' { name: "x" data_type: TYPE_INT32 dims: [2] }]',
     "output 'x' for model 'bare' is declared more than once in its configuration"),
    ('input [{ name: "text_input" data_type: TYPE_INT32 dims: [1] }]',
     "unable to load model 'bare', configuration expects datatype TYPE_INT32 for input "
     "'text_input', model provides TYPE_STRING"),
    ('input [{ name: "sampling_parameters" data_type: TYPE_FP32 dims: [1] }]',
     "configuration expects datatype TYPE_FP32 for input 'sampling_parameters', model provides "
     "TYPE_STRING"),
    ('input [{ name: "input_ids" data_type: TYPE_FP32 dims: [-1] }]',
     "configuration expects datatype TYPE_FP32 for input 'input_ids', model provides TYPE_INT32 "
     "or TYPE_INT64"),
])
def test_bad_configs(tmp_path: Path, text: str, message: str) -> None:
    folder = _model(tmp_path, "bare", [1], config=text)
    with pytest.raises(RepositoryError) as e:
        load_config(folder)
    assert e.value.code == grpc.StatusCode.INVALID_ARGUMENT
    assert message in e.value.message


def test_duplicate_tensor_in_a_load_override_is_refused() -> None:
    override = {"input": [{"name": "text_input", "data_type": "TYPE_STRING", "dims": [1]},
                          {"name": "text_input", "data_type": "TYPE_STRING", "dims": [1]}]}
    with pytest.raises(RepositoryError) as e:
        load_config(Path("/nonexistent/bare"), override=json.dumps(override))
    assert e.value.message == ("input 'text_input' for model 'bare' is declared more than once "
                               "in its configuration")


def test_tensor_types_the_engine_reads_load() -> None:
    """Every backend tensor at its own type, token ids also as INT32, flags of any type (they
    are read by truthiness, as the vLLM backend reads them)."""
    inputs = [{"name": "text_input", "data_type": "TYPE_STRING", "dims": [1]},
              {"name": "sampling_parameters", "data_type": "TYPE_STRING", "dims": [1]},
              {"name": "input_ids", "data_type": "TYPE_INT32", "dims": [-1]},
              {"name": "stream", "data_type": "TYPE_INT32", "dims": [1]}]
    config = load_config(Path("/nonexistent/bare"), override=json.dumps({"input": inputs}))
    types = {i.name: i.data_type for i in config.input}
    assert types["input_ids"] == mc.TYPE_INT32 and types["stream"] == mc.TYPE_INT32
    assert types["return_logprobs"] == mc.TYPE_BOOL  # filled in, as before


def test_engine_settings_from_parameters_and_model_json(tmp_path: Path) -> None:
    config = parse_config('name: "m" parameters { key: "block_size" value { string_value: "32" } }'
                          ' parameters { key: "max_num_seqs" value { string_value: "4" } }'
                          ' parameters { key: "REPORT_CUSTOM_METRICS"'
                          '              value { string_value: "true" } }')
    folder = _model(tmp_path, "m", [1], model_json={
        "model": "default", "max_num_seqs": 8, "gpu_memory_utilization": 0.5, "dtype": "auto",
        "enable_chunked_prefill": "false", "tensor_parallel_size": 1, "enforce_eager": True})
    settings = engine_config(config, folder / "1")
    assert settings.block_size == 32  # from parameters (strings cast)
    assert settings.max_num_seqs == 8  # model.json wins
    assert settings.gpu_memory_utilization == 0.5  # an EngineConfig field of its own
    assert settings.enable_chunked_prefill is False
    assert settings.dtype == "auto"  # vLLM's "auto": the engine picks for the device
    assert settings.tensor_parallel_size == 1


def test_gpu_memory_utilization_on_a_cpu_warns(tmp_path: Path,
                                              caplog: pytest.LogCaptureFixture) -> None:
    folder = _model(tmp_path, "m", [1], model_json={"device": "cpu",
                                                    "gpu_memory_utilization": 0.5})
    engine_config(load_config(folder), folder / "1")
    assert "kv_cache_memory_fraction" in caplog.text and "gpu_memory_utilization" in caplog.text
    caplog.clear()
    folder = _model(tmp_path, "quiet", [1], model_json={"device": "cpu",
                                                        "kv_cache_memory_fraction": 0.2})
    engine_config(load_config(folder), folder / "1")
    assert "gpu_memory_utilization" not in caplog.text


@pytest.mark.parametrize("device", ["cpu", "auto"])
def test_device_from_model_json(tmp_path: Path, device: str) -> None:
    folder = _model(tmp_path, "m", [1], model_json={"device": device})
    expected = "cuda" if device == "auto" and torch.cuda.is_available() else "cpu"
    assert engine_config(load_config(folder), folder / "1").device == expected


@pytest.mark.parametrize(("values", "message"), [
    ({"pipeline_parallel_size": 2}, "pipeline_parallel_size=2 is not supported"),
    ({"tensor_parallel_size": 0}, "tensor_parallel_size must be at least 1, got 0"),
    ({"tensor_parallel_size": 4, "nnodes": 3},
     "tensor_parallel_size=4 must be a multiple of nnodes=3"),
    ({"dtype": "int8"}, "'dtype' must be one of"),
    ({"block_size": "big"}, "'block_size' must be of type int"),
    ({"block_size": 12}, "block_size must be a positive power of two"),
    ({"device": "tpu"}, "device must be 'cpu', 'cuda' or 'cuda:N', got 'tpu'"),
    ({"device": "cuda:999"}, "device 'cuda:999' is not available"),
])
def test_bad_engine_settings(tmp_path: Path, values: dict[str, Any], message: str) -> None:
    folder = _model(tmp_path, "m", [1], model_json=values)
    with pytest.raises(RepositoryError) as e:
        engine_config(load_config(folder), folder / "1")
    assert message in e.value.message


def test_a_dead_engine_makes_its_version_unavailable(tmp_path: Path) -> None:
    """An engine that can run no more steps (a tensor-parallel worker died) takes its version
    out of service: UNAVAILABLE with the engine's error, not ready, not served."""
    _model(tmp_path, "a", [1])

    async def main() -> None:
        repo = ModelRepository(tmp_path, "explicit", ["a"], engine_factory=_stub_factory)
        await repo.start()
        assert repo.is_ready() and repo.ready_versions("a")
        repo.get("a").engine.dead = "worker rank 1 was killed"
        assert repo.index() == [("a", "1", "UNAVAILABLE", "worker rank 1 was killed")]
        assert not repo.is_ready() and not repo.ready_versions("a") and not repo.all_ready()
        assert repo.index(ready_only=True) == []
        for version in ("", "1"):
            with pytest.raises(RepositoryError) as e:
                repo.get("a", version)
            assert e.value.code == grpc.StatusCode.UNAVAILABLE
        await repo.load("a")  # a reload brings a new engine
        assert repo.is_ready() and repo.get("a").engine.dead is None
        await repo.shutdown()

    asyncio.run(main())


def test_a_dead_engine_fails_liveness_until_replaced(tmp_path: Path) -> None:
    """A dead engine makes the repository not live (nothing else would bring it back: the
    probe restarts the server); a reload stops it first and serves a new engine, a failed
    reload reports its own error and leaves nothing of the dead engine serving, an unload
    makes it live again too."""
    folder = _model(tmp_path, "a", [1])
    _model(tmp_path, "b", [1])
    order: list[str] = []

    def factory(config: EngineConfig, observers: Any = ()) -> tuple[Any, Any]:
        order.append("build")
        return _stub_factory(config, observers)

    async def main() -> None:
        repo = ModelRepository(tmp_path, "explicit", ["a", "b"], engine_factory=factory)
        await repo.start()
        assert repo.is_live() and repo.failed_versions() == []
        dead = repo.get("a").engine
        dead.shutdown = lambda: order.append("shutdown")  # type: ignore[method-assign]
        dead.dead = "worker rank 1 was killed"
        assert not repo.is_live()
        assert repo.failed_versions() == [("a", 1, "worker rank 1 was killed")]
        order.clear()
        await repo.load("a")
        assert order == ["shutdown", "build"]  # the dead ranks go before new ones start
        assert repo.is_live() and repo.is_ready() and repo.get("a").engine is not dead

        dead = repo.get("a").engine
        dead.dead = "worker rank 2 was killed"
        assert not repo.is_live()
        (folder / "1" / "model.json").write_text(json.dumps({"seed": 666}))
        with pytest.raises(RepositoryError) as e:
            await repo.load("a")
        error = "failed to load 'a' version 1: weights not found"
        assert e.value.message == error and dead.stopped
        assert repo.index() == [("a", "1", "UNAVAILABLE", error), ("b", "1", "READY", "")]
        assert repo.is_live() and not repo.is_ready()
        with pytest.raises(RepositoryError):
            repo.get("a")

        dead = repo.get("b").engine
        dead.dead = "worker rank 1 was killed"
        (tmp_path / "b" / "config.pbtxt").write_text("not a config {")  # fails before engines
        with pytest.raises(RepositoryError) as e:
            await repo.load("b")
        assert dead.stopped and repo.is_live()
        assert repo.index()[1] == ("b", "", "UNAVAILABLE", e.value.message)
        assert "failed to parse" in e.value.message

        (folder / "1" / "model.json").write_text("{}")
        await repo.load("a")
        repo.get("a").engine.dead = "worker rank 1 was killed"
        await repo.unload("a")
        assert repo.is_live() and repo.index()[0] == ("a", "1", "UNAVAILABLE", "unloaded")
        await repo.shutdown()

    asyncio.run(main())


def test_lookups_load_unload_and_index(tmp_path: Path) -> None:
    _model(tmp_path, "a", [1, 2])
    _model(tmp_path, "bad", [1], model_json={"seed": 666})

    async def main() -> None:
        repo = ModelRepository(tmp_path, "explicit", ["a"], engine_factory=_stub_factory)
        await repo.start()
        assert repo.index() == [("a", "2", "READY", ""), ("bad", "", "", "")]
        assert repo.get("a").version == 2 and repo.get("a", "2").version == 2
        for name, version, code in (("zzz", "", grpc.StatusCode.NOT_FOUND),
                                    ("a", "1", grpc.StatusCode.NOT_FOUND),
                                    ("a", "one", grpc.StatusCode.INVALID_ARGUMENT),
                                    # int() would read these as 2: versions are plain digits
                                    ("a", " 2", grpc.StatusCode.INVALID_ARGUMENT),
                                    ("a", "0_2", grpc.StatusCode.INVALID_ARGUMENT),
                                    ("a", "\u0662", grpc.StatusCode.INVALID_ARGUMENT)):
            with pytest.raises(RepositoryError) as e:
                repo.get(name, version)
            assert e.value.code == code
        with pytest.raises(RepositoryError):
            await repo.load("bad")
        assert repo.index()[1][2:] == ("UNAVAILABLE",
                                      "failed to load 'bad' version 1: weights not found")
        old = repo.get("a")
        await repo.load("a")  # reload: new engines, the old ones stopped
        assert repo.get("a") is not old and old.engine.stopped
        await repo.unload("a")
        await repo.unload("zzz")  # never loaded (or no such model): nothing to do, as Triton
        assert repo.index(ready_only=True) == []
        with pytest.raises(RepositoryError) as e:
            repo.get("a")
        assert e.value.code == grpc.StatusCode.UNAVAILABLE

    asyncio.run(main())


def test_poll_mode_follows_the_folder(tmp_path: Path) -> None:
    _model(tmp_path, "a", [1])

    async def main() -> None:
        repo = ModelRepository(tmp_path, "poll", engine_factory=_stub_factory)
        await repo.start()
        assert [r[:3] for r in repo.index()] == [("a", "1", "READY")]
        first = repo.get("a")
        _model(tmp_path, "b", [1])
        (tmp_path / "a" / "2").mkdir()
        stamp = (tmp_path / "a" / "config.pbtxt")
        os.utime(stamp, ns=(stamp.stat().st_mtime_ns + 10**9,) * 2)
        await repo.poll_once()
        assert [r[:3] for r in repo.index()] == [("a", "2", "READY"), ("b", "1", "READY")]
        assert first.engine.stopped
        for child in sorted((tmp_path / "b").rglob("*"), reverse=True):
            child.unlink() if child.is_file() else child.rmdir()
        (tmp_path / "b").rmdir()
        await repo.poll_once()
        assert [r[0] for r in repo.index()] == ["a"]

    asyncio.run(main())


def test_a_load_whose_caller_goes_away_runs_to_its_end(tmp_path: Path) -> None:
    """A cancelled RepositoryModelLoad (the client's deadline) leaves no version LOADING and
    no engine unowned: the load finishes and serves, as Triton's does."""
    _model(tmp_path, "a", [1])
    building = threading.Event()
    release = threading.Event()

    def slow(config: EngineConfig, observers: Any = ()) -> tuple[Any, Any]:
        building.set()
        release.wait(60)
        return _stub_factory(config, observers)

    async def main() -> None:
        repo = ModelRepository(tmp_path, "explicit", engine_factory=slow)
        caller = asyncio.create_task(repo.load("a"))
        await asyncio.to_thread(building.wait, 60)
        caller.cancel()
        with pytest.raises(asyncio.CancelledError):
            await caller
        release.set()
        for _ in range(600):  # the load finishes on its own
            if repo.is_ready():
                break
            await asyncio.sleep(0.1)
        assert repo.get("a").engine is not None
        assert [row[2] for row in repo.index() if row[0] == "a"] == ["READY"]
        await repo.shutdown()

    asyncio.run(main())
