"""LoRA in the repository and the request mapping, without weights: ``multi_lora.json`` and the
LoRA engine settings checked at load (stub engines), ``lora_name`` taken out of the sampling
parameters with the vLLM backend's answers, ``--lora-modules`` parsed as vLLM parses it, and
the ``vllm:lora_requests_info`` gauge and request spans fed from engine records."""

from __future__ import annotations

import asyncio
import json
import os
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from opentelemetry.sdk.trace import TracerProvider
from opentelemetry.sdk.trace.export import SimpleSpanProcessor
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter
from prometheus_client import CollectorRegistry, generate_latest
from prometheus_client.parser import text_string_to_metric_families

from pagedserve.config import EngineConfig
from pagedserve.engine.metrics import EngineMetrics, MetricFamilies
from pagedserve.engine.stats import RequestInfo, StepStats
from pagedserve.engine.tracing import EngineTracer, TraceSettings
from pagedserve.lora_request import LoRARequest
from pagedserve.repository import ModelRepository, RepositoryError
from pagedserve.repository.lora import (
    LORA_NOT_ENABLED,
    AdapterTable,
    UnknownLoRA,
    lora_request_for,
)
from pagedserve.server.lora_modules import LoRAModule, parse_lora_modules
from pagedserve.tensors import parse_request


class _Engine:
    def __init__(self, config: EngineConfig) -> None:
        self.config = config
        self.in_flight = 0

    def shutdown(self, reason: str = "") -> None:
        pass

    def failure(self) -> str | None:
        return None


def _factory(config: EngineConfig, observers: Any = ()) -> tuple[Any, Any]:
    return _Engine(config), None


def _adapter_dir(path: Path) -> Path:
    path.mkdir(parents=True)
    (path / "adapter_config.json").write_text("{}")
    return path


def _model(root: Path, name: str, model_json: dict[str, Any],
           multi_lora: Any = None) -> Path:
    version = root / name / "1"
    version.mkdir(parents=True, exist_ok=True)
    (root / name / "config.pbtxt").write_text('backend: "vllm"')
    (version / "model.json").write_text(json.dumps(model_json))
    if multi_lora is not None:
        text = multi_lora if isinstance(multi_lora, str) else json.dumps(multi_lora)
        (version / "multi_lora.json").write_text(text)
    return version


LORA = {"enable_lora": True, "max_loras": 2, "max_lora_rank": 8}


def _load(root: Path, name: str) -> Any:
    async def run() -> Any:
        repo = ModelRepository(root, "explicit", engine_factory=_factory)
        await repo.load(name)
        return repo.get(name)
    return asyncio.run(run())


def _refusal(root: Path, name: str) -> str:
    with pytest.raises(RepositoryError) as refused:
        _load(root, name)
    assert str(root) not in refused.value.message  # never a server path
    return refused.value.message


def test_multi_lora_json_is_the_versions_adapter_table(tmp_path: Path) -> None:
    _adapter_dir(tmp_path / "m" / "adapters" / "sql")
    shared = _adapter_dir(tmp_path / ".shared" / "chat")
    _model(tmp_path, "m", LORA, {"sql": "../adapters/sql", "chat": str(shared)})
    version = _load(tmp_path, "m")
    table = version.loras
    assert table.names() == ["sql", "chat"]  # file order: ids 1, 2
    assert table.get("sql") == LoRARequest("sql", 1, str((tmp_path / "m/adapters/sql")
                                                           .resolve()))
    assert table.get("chat") == LoRARequest("chat", 2, str(shared.resolve()))
    assert version.engine.config.max_loras == 2 and version.engine.config.max_lora_rank == 8


def test_lora_enabled_without_multi_lora_json_has_an_empty_table(tmp_path: Path) -> None:
    _model(tmp_path, "m", LORA)
    assert len(_load(tmp_path, "m").loras) == 0
    _model(tmp_path, "plain", {})
    assert _load(tmp_path, "plain").loras is None


@pytest.mark.parametrize(("multi_lora", "expected"), [
    ({"a": "../../../../etc"}, "adapter 'a' must name a folder inside the model repository"),
    ({"a": "/etc"}, "adapter 'a' must name a folder inside the model repository"),
    ({"a": "missing"}, "adapter 'a' names no folder"),
    (["a", "b"], "is not a JSON object"),
    ('{"a": "x", "a": "y"}', "appears twice"),
    ("{nope", "is not valid JSON"),
    ({"a": 5}, "the path of adapter 'a' must be a non-empty string, got 5"),
    ({"a,b": "x"}, "adapter name 'a,b' must hold printable characters only, no commas"),
    ({"m": "x"}, "adapter 'm' is named like a model of the repository"),
])
def test_a_bad_multi_lora_json_fails_the_load(tmp_path: Path, multi_lora: Any,
                                              expected: str) -> None:
    _model(tmp_path, "m", LORA, multi_lora)
    message = _refusal(tmp_path, "m")
    assert message.startswith("1/multi_lora.json of model 'm'"), message
    assert expected in message, message


def test_a_symlink_out_of_the_repository_is_refused(tmp_path: Path) -> None:
    outside = _adapter_dir(tmp_path / "outside")
    root = tmp_path / "repo"
    version = _model(root, "m", LORA, {"a": "link"})
    os.symlink(outside, version / "link")
    assert "adapter 'a' must name a folder inside the model repository" in \
        _refusal(root, "m")


def test_multi_lora_json_without_enable_lora_fails_the_load(tmp_path: Path) -> None:
    _adapter_dir(tmp_path / "m" / "1" / "a")
    _model(tmp_path, "m", {}, {"a": "a"})
    assert _refusal(tmp_path, "m") == (
        "1/multi_lora.json of model 'm' lists LoRA adapters, but LoRA is not enabled: set "
        "\"enable_lora\": true in model.json (or the config parameter enable_lora)")


@pytest.mark.parametrize(("settings", "expected"), [
    ({"enable_lora": "yes"}, "engine setting 'enable_lora' must be of type bool, got 'yes'"),
    ({"enable_lora": True, "max_loras": 0}, "max_loras must be an integer in [1, 1024], got 0"),
    ({"enable_lora": True, "max_lora_rank": 1.5},
     "engine setting 'max_lora_rank' must be of type int, got 1.5"),
    ({"enable_lora": True, "max_loras": 4, "max_cpu_loras": 2},
     "max_cpu_loras (2) must be at least max_loras (4)"),
])
def test_lora_engine_settings_are_checked_strictly(tmp_path: Path, settings: dict[str, Any],
                                                   expected: str) -> None:
    _model(tmp_path, "m", settings)
    assert expected in _refusal(tmp_path, "m")


def test_an_adapter_name_serves_one_model_only(tmp_path: Path) -> None:
    _adapter_dir(tmp_path / "a" / "1" / "x")
    _adapter_dir(tmp_path / "b" / "1" / "x")
    _model(tmp_path, "a", LORA, {"x": "x"})
    _model(tmp_path, "b", LORA, {"x": "x"})

    async def run() -> str:
        repo = ModelRepository(tmp_path, "explicit", engine_factory=_factory)
        await repo.load("a")
        with pytest.raises(RepositoryError) as refused:
            await repo.load("b")
        await repo.load("a")  # a reload of the holder itself is no clash
        return refused.value.message
    assert asyncio.run(run()) == "LoRA adapter 'x' of model 'b' is served by model 'a' already"


def test_lora_name_is_taken_out_of_the_sampling_parameters() -> None:
    text = np.array([b"Hi"], dtype=np.object_)
    params = np.array([json.dumps({"lora_name": "sql", "max_tokens": 3}).encode()],
                      dtype=np.object_)
    request = parse_request({"text_input": text, "sampling_parameters": params})
    assert request.lora_name == "sql" and request.params.max_tokens == 3
    request = parse_request({"text_input": text}, {"lora_name": "chat", "temperature": "0"})
    assert request.lora_name == "chat" and request.params.temperature == 0
    # As the vLLM backend: with a sampling_parameters input, request parameters are not read.
    request = parse_request({"text_input": text, "sampling_parameters": params},
                            {"lora_name": "chat"})
    assert request.lora_name == "sql"
    assert parse_request({"text_input": text}).lora_name is None


def test_the_vllm_backends_answers() -> None:
    table = AdapterTable("m", [("doll", "/a"), ("sheep", "/b")])
    assert lora_request_for(table, None) is None
    assert lora_request_for(table, "sheep") == LoRARequest("sheep", 2, "/b")
    with pytest.raises(UnknownLoRA) as refused:
        lora_request_for(table, "cow")
    assert str(refused.value) == \
        "LoRA cow is not supported, we currently support ['doll', 'sheep']"
    with pytest.raises(UnknownLoRA) as refused:
        lora_request_for(None, "doll")
    assert str(refused.value) == LORA_NOT_ENABLED == "LoRA feature is not enabled."


def test_adapter_ids_are_never_reused() -> None:
    table = AdapterTable("m", [("a", "/a")])
    table.remove("a")
    assert table.add("a", "/a").lora_int_id == 2
    assert table.add("a", "/c").lora_int_id == 3 and table.names() == ["a"]


def test_lora_modules_take_vllms_forms(tmp_path: Path) -> None:
    a, b = _adapter_dir(tmp_path / "a"), _adapter_dir(tmp_path / "b")
    parsed = parse_lora_modules([f"sql={a}", "",
                                 json.dumps({"name": "chat", "path": str(b),
                                             "base_model_name": "m"})])
    assert parsed == (LoRAModule("sql", str(a.resolve())),
                      LoRAModule("chat", str(b.resolve()), "m"))
    for values, expected in [
            ([f"sql={tmp_path / 'none'}"], "--lora-modules: adapter 'sql' names no folder"),
            (["{not json"], "Invalid JSON format for --lora-modules: {not json"),
            ([json.dumps({"name": "x"})], "Invalid fields for --lora-modules"),
            ([f"a,b={a}"], "Invalid JSON format for --lora-modules"),
            ([f"x={a}", f"x={b}"], "--lora-modules: adapter 'x' is given twice")]:
        with pytest.raises(ValueError) as refused:
            parse_lora_modules(values)
        assert str(refused.value).startswith(expected), str(refused.value)


def _step(served: tuple[str, ...], preempted: tuple[str, ...] = ()) -> StepStats:
    return StepStats(step=1, start_ns=0, scheduled_ns=1, forwarded_ns=2, sampled_ns=3,
                     end_ns=4, num_running=len(served), num_waiting=0, num_preempted=0,
                     num_prefill_tokens=0, num_decode_tokens=0, num_scheduled_seqs=0,
                     num_generated_tokens=0, num_blocks_used=0, num_blocks_free=10,
                     num_blocks_cached=0, num_blocks_total=10, prefix_cache_queried_tokens=0,
                     prefix_cache_hit_tokens=0, num_cow_copies=0, num_evictions=0,
                     request_ids=served, preempted_request_ids=preempted)


def _lora_series(registry: CollectorRegistry) -> list[dict[str, str]]:
    text = generate_latest(registry).decode()
    return [dict(s.labels) for f in text_string_to_metric_families(text)
            if f.name == "vllm:lora_requests_info" for s in f.samples]


def test_lora_requests_info_follows_the_requests() -> None:
    registry = CollectorRegistry()
    metrics = EngineMetrics(MetricFamilies(registry), "m", 1)
    assert _lora_series(registry) == []  # until the engine serves LoRA
    metrics.serve_lora(4)
    base = {"model_name": "m", "engine": "1", "max_lora": "4"}
    assert _lora_series(registry) == [{**base, "waiting_lora_adapters": "",
                                       "running_lora_adapters": ""}]
    for rid, lora in (("r1", "sql"), ("r2", "chat"), ("r3", None)):
        metrics.on_request_added(RequestInfo(rid, 0, 4, 8, 0.0, 1.0, 1, lora_name=lora))
    metrics.on_step(_step(("r1", "r3")))
    assert _lora_series(registry) == [{**base, "waiting_lora_adapters": "chat",
                                       "running_lora_adapters": "sql"}]
    metrics.on_step(_step(("r2",), preempted=("r1",)))
    assert _lora_series(registry) == [{**base, "waiting_lora_adapters": "sql",
                                       "running_lora_adapters": "chat"}]
    metrics.shutdown()
    assert _lora_series(registry) == []


def test_the_request_span_names_its_adapter() -> None:
    exporter = InMemorySpanExporter()
    provider = TracerProvider()
    provider.add_span_processor(SimpleSpanProcessor(exporter))
    tracer = EngineTracer(provider, TraceSettings(level="TIMESTAMPS", rate=1), "m", "1")
    tracer.on_request_added(RequestInfo("r1", 0, 4, 8, 0.0, 1.0, 1, lora_name="sql"))
    tracer.on_request_added(RequestInfo("r2", 0, 4, 8, 0.0, 1.0, 1))
    tracer.shutdown()
    spans = {s.attributes["gen_ai.request.id"]: s.attributes
             for s in exporter.get_finished_spans()}
    assert spans["r1"]["gen_ai.request.lora_name"] == "sql"
    assert "gen_ai.request.lora_name" not in spans["r2"]
