"""``/metrics`` end to end: a known workload moves the counters by exactly what it did.

One server for the module. The fast tests at the top need none: the repository collector on a
stub repository, and the Grafana dashboard's queries against the names the code registers.
"""

from __future__ import annotations

import asyncio
import json
import queue
import re
import time
import urllib.request
from collections.abc import Callable, Iterator
from types import SimpleNamespace
from typing import Any

import pytest
import tritonclient.grpc as grpcclient
import tritonclient.grpc.aio as aioclient
from prometheus_client import CONTENT_TYPE_LATEST, CollectorRegistry, generate_latest
from prometheus_client.parser import text_string_to_metric_families

from pagedserve.engine.metrics import EngineMetrics
from pagedserve.repository.statistics import ModelStats
from pagedserve.server.metrics import MetricFamilies, RepositoryCollector
from tests.server.conftest import (
    MODEL,
    ROOT,
    ServerHandle,
    is_final,
    llm_inputs,
)

DASHBOARD = ROOT / "deploy" / "grafana" / "pagedserve.json"
VLLM = {"model_name": MODEL, "engine": "1"}
OWN = {"model": MODEL, "version": "1"}
# Several blocks (16 tokens each) of prompt, so a second run of it hits the prefix cache.
SHARED_PROMPT = ("Paged attention stores the keys and values of every sequence in fixed-size "
                 "blocks, looked up through a block table, so memory is allocated as tokens "
                 "arrive and identical prompt prefixes share their blocks. Summarize:")


class Page:
    """A parsed metrics page: sample values by name and labels."""

    def __init__(self, text: str) -> None:
        self.families = {f.name: f for f in text_string_to_metric_families(text)}
        self.samples = {(s.name, frozenset(s.labels.items())): s.value
                        for f in self.families.values() for s in f.samples}

    def get(self, name: str, labels: dict[str, str] = VLLM, **more: str) -> float:
        return self.samples[(name, frozenset({**labels, **more}.items()))]

    def names(self) -> set[str]:
        return {name for name, _ in self.samples}


# ---- no server -----------------------------------------------------------------------------


def _stub_model(name: str, version: int, blocks: int) -> Any:
    return SimpleNamespace(name=name, version=version, stats=ModelStats(),
                           engine=SimpleNamespace(limits=SimpleNamespace(
                               num_usable_blocks=blocks)))


class _StubRepository:
    def __init__(self, *models: Any) -> None:
        self.models = list(models)

    def all_ready(self) -> list[Any]:
        return self.models


def _registry(*models: Any) -> CollectorRegistry:
    """What the server registers: the engine families (one engine) and the collector."""
    registry = CollectorRegistry()
    EngineMetrics(MetricFamilies(registry), MODEL, 1)
    registry.register(RepositoryCollector(_StubRepository(*models)))  # type: ignore[arg-type]
    return registry


def test_repository_collector_serves_tritons_counters() -> None:
    model = _stub_model(MODEL, 1, 7)
    model.stats.record(True, 5_000_000, {"queue": 1_000_000, "compute_input": 2_000,
                                         "compute_infer": 3_000_000, "compute_output": 1_000})
    model.stats.record(False, 2_000_000)
    page = Page(generate_latest(_registry(model)).decode())
    expected = {"nv_inference_request_success": 1, "nv_inference_request_failure": 1,
                "nv_inference_request_duration_us": 5000, "nv_inference_queue_duration_us": 1000,
                "nv_inference_compute_input_duration_us": 2,
                "nv_inference_compute_infer_duration_us": 3000,
                "nv_inference_compute_output_duration_us": 1, "nv_inference_count": 1,
                "nv_inference_exec_count": 1, "pagedserve_kv_blocks_total": 7}
    assert {name: page.get(name, OWN) for name in expected} == expected
    # Triton's names, without the _total a typed counter would get.
    assert page.families["nv_inference_request_success"].type == "unknown"
    assert page.families["pagedserve_kv_blocks_total"].type == "gauge"


def test_repository_collector_lists_ready_versions_only() -> None:
    repository = _StubRepository(_stub_model(MODEL, 1, 7), _stub_model("other", 2, 9))
    collector = RepositoryCollector(repository)  # type: ignore[arg-type]
    registry = CollectorRegistry()
    registry.register(collector)
    page = Page(generate_latest(registry).decode())
    assert page.get("pagedserve_kv_blocks_total", {"model": "other", "version": "2"}) == 9
    repository.models.pop()  # unloaded
    page = Page(generate_latest(registry).decode())
    assert ("pagedserve_kv_blocks_total", frozenset({"model": "other", "version": "2"}.items())
            ) not in page.samples


def _exprs(dashboard: dict[str, Any]) -> Iterator[str]:
    for panel in dashboard["panels"]:
        for target in panel["targets"]:
            yield target["expr"]
    for variable in dashboard["templating"]["list"]:
        if variable["type"] == "query":
            yield variable["definition"]


def test_dashboard_queries_registered_metrics() -> None:
    dashboard = json.loads(DASHBOARD.read_text())
    variables = {v["name"]: v for v in dashboard["templating"]["list"]}
    assert variables["datasource"]["type"] == "datasource"
    assert variables["datasource"]["query"] == "prometheus"
    for panel in dashboard["panels"]:
        assert panel["datasource"]["uid"] == "${datasource}", panel["title"]
        assert panel["targets"], panel["title"]
        assert all(t["datasource"]["uid"] == "${datasource}" for t in panel["targets"])
    page = Page(generate_latest(_registry(_stub_model(MODEL, 1, 7))).decode())
    labels_of: dict[str, set[str]] = {}
    for name, labels in page.samples:
        labels_of.setdefault(name, set()).update(k for k, _ in labels)
    queried = set()
    for expr in _exprs(dashboard):
        names = re.findall(r"(?:vllm:|pagedserve_|nv_)[A-Za-z0-9_:]+", expr)
        assert names, expr
        for name in names:
            assert name in labels_of, f"{name} (in {expr}) is not on the page"
            queried.add(name)
        for name, selector in re.findall(r"([A-Za-z_:][A-Za-z0-9_:]*)\{([^}]*)\}", expr):
            for label in re.findall(r"(\w+)\s*(?:=~|!~|!=|=)", selector):
                assert label in labels_of[name], f"{name} has no label {label}"
    for title in ("vllm:num_requests_running", "vllm:num_requests_waiting",
                  "vllm:kv_cache_usage_perc", "vllm:prefix_cache_hits_total",
                  "vllm:time_to_first_token_seconds_bucket",
                  "vllm:inter_token_latency_seconds_bucket",
                  "vllm:e2e_request_latency_seconds_bucket", "vllm:generation_tokens_total",
                  "vllm:num_preemptions_total", "vllm:request_success_total",
                  "nv_inference_request_success", "nv_inference_request_failure"):
        assert title in queried, title


# ---- the server ----------------------------------------------------------------------------


def _page(server: ServerHandle) -> Page:
    with urllib.request.urlopen(server.http_url + "/metrics", timeout=10) as response:
        assert response.headers["Content-Type"] == CONTENT_TYPE_LATEST
        return Page(response.read().decode())


def _wait(server: ServerHandle, done: Callable[[Page], bool], timeout: float = 30) -> Page:
    deadline = time.monotonic() + timeout
    while True:
        page = _page(server)
        if done(page):
            return page
        assert time.monotonic() < deadline, "metrics did not settle:\n" + "\n".join(
            f"{name}{dict(labels)} {value}" for (name, labels), value in page.samples.items()
            if name.startswith(("vllm:num_", "vllm:request_success", "pagedserve_"))
            or name == "vllm:generation_tokens_total")
        time.sleep(0.1)


def _idle(page: Page) -> bool:
    return (page.get("vllm:num_requests_running") == 0
            and page.get("vllm:num_requests_waiting") == 0
            and page.get("pagedserve_kv_blocks_used", OWN) == 0
            and page.get("pagedserve_requests_running", OWN) == 0)


def _run(server: ServerHandle, requests: list[tuple[str, str, int]]) -> dict[str, int]:
    """Streams ``(id, prompt, max_tokens)`` requests on one stream; returns prompt lengths."""
    client = grpcclient.InferenceServerClient(server.grpc_url)
    results: queue.Queue[tuple[Any, Any]] = queue.Queue()
    client.start_stream(callback=lambda result, error: results.put((result, error)))
    for request_id, prompt, max_tokens in requests:
        client.async_stream_infer(MODEL, llm_inputs(prompt, max_tokens,
                                                    params={"ignore_eos": True},
                                                    return_num_input_tokens=True),
                                  request_id=request_id)
    prompt_tokens: dict[str, int] = {}
    while len(prompt_tokens) < len(requests):
        result, error = results.get(timeout=120)
        assert error is None, error
        if is_final(result):
            request_id = result.get_response().id
            prompt_tokens[request_id] = int(result.as_numpy("num_input_tokens")[0])
    client.stop_stream()
    client.close()
    return prompt_tokens


def _delta(before: Page, after: Page) -> Callable[..., float]:
    def delta(name: str, labels: dict[str, str] = VLLM, **more: str) -> float:
        return after.get(name, labels, **more) - before.get(name, labels, **more)
    return delta


@pytest.mark.slow
def test_a_known_workload_moves_the_counters_exactly(server: ServerHandle) -> None:
    before = _wait(server, _idle)
    lengths = {"a": 5, "b": 7, "c": 9}
    prompts = _run(server, [("a", "The capital of France is", 5),
                                    ("b", "def fibonacci(n):", 7),
                                    ("c", "Once upon a time,", 9)])
    # The same prompt twice, one after the other: the second finds the first's blocks.
    prompts.update(_run(server, [("p1", SHARED_PROMPT, 3)]))
    prompts.update(_run(server, [("p2", SHARED_PROMPT, 3)]))
    lengths.update(p1=3, p2=3)
    n = len(lengths)
    # Triton's statistics are recorded as each stream ends: wait for them, then read it all.
    after = _wait(server, lambda page: page.get(
        "nv_inference_request_success", OWN) - before.get(
        "nv_inference_request_success", OWN) == n)
    delta = _delta(before, after)
    generated = sum(lengths.values())
    assert delta("vllm:generation_tokens_total") == generated
    assert delta("vllm:prompt_tokens_total") == sum(prompts.values())
    assert delta("vllm:request_success_total", finished_reason="length") == n
    for reason in ("stop", "abort", "error"):
        assert delta("vllm:request_success_total", finished_reason=reason) == 0
    for histogram in ("vllm:time_to_first_token_seconds", "vllm:e2e_request_latency_seconds",
                      "vllm:request_queue_time_seconds", "vllm:request_prompt_tokens",
                      "vllm:request_generation_tokens"):
        assert delta(histogram + "_count") == n, histogram
    # One gap between each request's consecutive tokens.
    assert delta("vllm:inter_token_latency_seconds_count") == generated - n
    assert delta("vllm:request_prompt_tokens_sum") == sum(prompts.values())
    assert delta("vllm:request_generation_tokens_sum") == generated
    hits = delta("vllm:prefix_cache_hits_total")
    assert hits >= 16  # at least one whole block of the shared prompt
    assert delta("vllm:prefix_cache_queries_total") >= hits + prompts["p1"]
    assert delta("vllm:num_preemptions_total") == 0
    # Every step's tokens are the prefill computed (cache hits skipped) and the decodes run.
    computed = delta("pagedserve_prompt_tokens_total", OWN)
    assert computed == sum(prompts.values()) - hits
    assert delta("vllm:iteration_tokens_total_sum") == (
        computed + delta("pagedserve_generation_tokens_total", OWN))
    assert delta("nv_inference_request_failure", OWN) == 0
    assert delta("nv_inference_count", OWN) == n
    assert delta("nv_inference_exec_count", OWN) == n
    assert delta("nv_inference_request_duration_us", OWN) > 0


@pytest.mark.slow
def test_an_aborted_request_counts_as_abort(server: ServerHandle) -> None:
    before = _wait(server, _idle)

    async def main() -> tuple[int, int]:
        client = aioclient.InferenceServerClient(server.grpc_url)

        async def requests():  # type: ignore[no-untyped-def]
            yield {"model_name": MODEL, "request_id": "x",
                   "inputs": llm_inputs("Count to a thousand:", 1000,
                                        params={"ignore_eos": True},
                                        return_num_input_tokens=True)}
            await asyncio.sleep(3600)  # keep the stream open: the client cancels it

        stream = client.stream_infer(requests())
        seen = prompt_tokens = 0
        async for result, error in stream:
            assert error is None
            prompt_tokens = int(result.as_numpy("num_input_tokens")[0])
            seen += 1
            if seen == 5:
                stream.cancel()
                break
        await client.close()
        return seen, prompt_tokens

    _, prompt_tokens = asyncio.run(asyncio.wait_for(main(), 120))
    after = _wait(server, lambda page: page.get(
        "vllm:request_success_total", finished_reason="abort") - before.get(
        "vllm:request_success_total", finished_reason="abort") == 1)
    delta = _delta(before, after)
    generated = delta("vllm:generation_tokens_total")
    assert 5 <= generated < 1000  # what it made before the abort reached the engine
    assert delta("vllm:request_generation_tokens_sum") == generated
    assert delta("vllm:prompt_tokens_total") == prompt_tokens
    assert delta("vllm:inter_token_latency_seconds_count") == generated - 1
    for histogram in ("vllm:time_to_first_token_seconds", "vllm:e2e_request_latency_seconds",
                      "vllm:request_queue_time_seconds"):
        assert delta(histogram + "_count") == 1, histogram
    for reason in ("stop", "length", "error"):
        assert delta("vllm:request_success_total", finished_reason=reason) == 0


@pytest.mark.slow
def test_gauges_return_to_zero_when_idle(server: ServerHandle) -> None:
    # The abort above ended the engine's last request outside a step.
    page = _wait(server, _idle)
    assert page.get("vllm:kv_cache_usage_perc") == 0
    assert page.get("pagedserve_requests_waiting", OWN) == 0
    assert page.get("pagedserve_kv_blocks_total", OWN) > 0
    assert page.get("nv_inference_request_success", OWN) >= 5


def test_the_whole_page_parses(server: ServerHandle) -> None:
    page = _page(server)
    assert {"vllm:num_requests_running", "vllm:prompt_tokens_total",
            "vllm:request_success_total", "vllm:iteration_tokens_total_bucket",
            "pagedserve_kv_blocks_total", "nv_inference_count"} <= page.names()
