"""``pagedserve.python_backend.model`` outside Triton: a stand-in
``triton_python_backend_utils``."""

from __future__ import annotations

import asyncio
import importlib
import logging
import sys
import types
from concurrent.futures import Future
from typing import Any

import pytest


@pytest.fixture
def model(monkeypatch: pytest.MonkeyPatch) -> tuple[Any, list[str]]:
    """The module, imported against a fake ``pb_utils``; and what it logged to Triton as errors."""
    errors: list[str] = []
    fake = types.ModuleType("triton_python_backend_utils")
    fake.TRITONSERVER_RESPONSE_COMPLETE_FINAL = 1  # type: ignore[attr-defined]
    fake.Logger = types.SimpleNamespace(  # type: ignore[attr-defined]
        log_info=lambda _: None, log_error=errors.append)
    monkeypatch.setitem(sys.modules, "triton_python_backend_utils", fake)
    monkeypatch.delitem(sys.modules, "pagedserve.python_backend.model", raising=False)
    module = importlib.import_module("pagedserve.python_backend.model")
    monkeypatch.setattr(module, "CANCEL_POLL_S", 0.01)
    return module, errors


class Sender:
    def __init__(self, cancelled: bool = False, broken: bool = False) -> None:
        self.cancelled, self.broken, self.asked = cancelled, broken, 0

    def is_cancelled(self) -> bool:
        self.asked += 1
        if self.broken:
            raise RuntimeError("sender released")
        return self.cancelled


def _instance(module: Any) -> Any:
    instance = module.TritonPythonModel()
    instance._tasks, instance._closing, instance._name = {}, False, "m"
    return instance


def test_a_failing_sender_does_not_stop_the_watch(
        model: tuple[Any, list[str]], caplog: pytest.LogCaptureFixture) -> None:
    module, _ = model
    instance = _instance(module)

    async def scenario() -> None:
        loop = asyncio.get_running_loop()
        done = loop.create_future()
        done.set_result(None)
        finished_sender, broken, cancelled = Sender(broken=True), Sender(broken=True), Sender()
        instance._tasks = {done: finished_sender, loop.create_future(): broken}
        watcher = loop.create_task(instance._watch_cancellations())
        await asyncio.sleep(0.05)
        assert broken.asked > 0 and finished_sender.asked == 0  # a done task is not asked
        victim = loop.create_future()
        instance._tasks[victim] = cancelled
        cancelled.cancelled = True
        await asyncio.sleep(0.05)
        assert victim.cancelled() and not watcher.done()  # a later cancellation is still seen
        watcher.cancel()

    with caplog.at_level(logging.ERROR):
        asyncio.run(scenario())
    assert "could not ask a request" in caplog.text


def test_an_unexpected_watch_exit_is_logged(model: tuple[Any, list[str]]) -> None:
    module, errors = model
    instance = _instance(module)
    cancelled: Future[None] = Future()
    cancelled.cancel()
    instance._watcher_ended(cancelled)  # finalize's own cancel
    assert errors == []
    failed: Future[None] = Future()
    failed.set_exception(MemoryError("boom"))
    instance._watcher_ended(failed)
    assert len(errors) == 1 and "no longer sees cancellations" in errors[0] and "boom" in errors[0]


def test_each_instance_writes_its_own_gauge_series() -> None:
    from pagedserve.python_backend.metrics import TritonEngineGauges

    created: list[dict[str, str]] = []

    class Family:
        GAUGE = 0

        def __init__(self, **_: Any) -> None:
            pass

        def Metric(self, labels: dict[str, str]) -> Any:  # pb_utils' name
            created.append(labels)
            return types.SimpleNamespace(set=lambda _: None)

    fake = types.SimpleNamespace(MetricFamily=Family)
    TritonEngineGauges(fake, "m", "1", "m_0_0")
    TritonEngineGauges(fake, "m", "1", "m_0_1")
    assert {labels["instance"] for labels in created} == {"m_0_0", "m_0_1"}
    assert all(labels["model"] == "m" and labels["version"] == "1" for labels in created)
