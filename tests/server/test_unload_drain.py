"""Unloading a model drains it, as Triton does: at once not ready and new requests refused, the
requests in flight (streaming and unary) run to their final responses, then the engine stops;
after the server's grace period the ones still running are cut with an error naming the unload.
A load during the drain serves the new engine at once; a reload drains the old one.

The first tests drive the repository with stub engines; the rest go through the real server
with ``tritonclient``, a stream on a decoupled model and a unary request on a plain one, each
model unloaded while its request runs. Token counts come from the responses themselves.
"""

from __future__ import annotations

import asyncio
import queue
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import grpc
import pytest
import tritonclient.grpc as grpcclient
from tritonclient.utils import InferenceServerException

from pagedserve.repository import ModelRepository, RepositoryError
from tests.server.conftest import (
    ServerHandle,
    add_default_model,
    is_final,
    llm_inputs,
    start_server,
)
from tests.server.test_repository import _model, _stub_factory

MODEL = "tiny"  # decoupled: streams its tokens
PLAIN = "plain"  # not decoupled: unary ModelInfer
PROMPT = "Count to one hundred:"
# Seconds allowed for anything this machine does (a load, a few hundred tokens) when it is busy:
# only a stall exceeds it.
MARGIN = 120


# ---- the repository, with stub engines ----------------------------------------------------


def test_unload_waits_for_the_requests_in_flight(tmp_path: Path) -> None:
    _model(tmp_path, "a", [1])

    async def main() -> None:
        repo = ModelRepository(tmp_path, "explicit", ["a"], engine_factory=_stub_factory)
        await repo.start()
        engine = repo.get("a").engine
        engine.in_flight = 2
        unloading = asyncio.create_task(repo.unload("a"))
        await asyncio.sleep(0.3)
        assert not unloading.done() and not engine.stopped
        assert repo.index() == [("a", "1", "UNLOADING", "")]
        assert not repo.is_ready() and not repo.ready_versions("a")
        with pytest.raises(RepositoryError) as e:
            repo.get("a")
        assert e.value.code == grpc.StatusCode.UNAVAILABLE
        assert e.value.message == "Request for unknown model: 'a' has no available versions"
        engine.in_flight = 0  # the last request ended
        await asyncio.wait_for(unloading, 10)
        assert engine.stopped and repo.index() == [("a", "1", "UNAVAILABLE", "unloaded")]

    asyncio.run(main())


def test_the_drain_is_bounded_and_names_the_unload(tmp_path: Path) -> None:
    _model(tmp_path, "a", [1])

    async def main() -> None:
        repo = ModelRepository(tmp_path, "explicit", ["a"], engine_factory=_stub_factory,
                               drain_seconds=0.5)
        await repo.start()
        engine = repo.get("a").engine
        engine.in_flight = 1  # never ends by itself
        await asyncio.wait_for(repo.unload("a"), 10)
        assert engine.stop_reason == ("model 'a' version 1 was unloaded: the request did not "
                                      "finish within the 0.5 s an unload waits for requests in "
                                      "flight")
        assert repo.index() == [("a", "1", "UNAVAILABLE", "unloaded")]

    asyncio.run(main())


def test_load_during_a_drain_serves_the_new_engine_and_shutdown_ends_drains(
        tmp_path: Path) -> None:
    _model(tmp_path, "a", [1])

    async def main() -> None:
        repo = ModelRepository(tmp_path, "explicit", ["a"], engine_factory=_stub_factory)
        await repo.start()
        old = repo.get("a").engine
        old.in_flight = 1
        unloading = asyncio.create_task(repo.unload("a"))
        await asyncio.sleep(0.1)
        await asyncio.wait_for(repo.load("a"), 10)  # does not wait for the drain
        assert repo.index() == [("a", "1", "READY", "")] and repo.get("a").engine is not old
        assert not old.stopped and not unloading.done()
        old.in_flight = 0
        await asyncio.wait_for(unloading, 10)
        assert old.stopped and repo.index() == [("a", "1", "READY", "")]  # the new one serves

        new = repo.get("a").engine
        new.in_flight = 1
        reloading = asyncio.create_task(repo.load("a"))  # a reload drains the old engine too
        await asyncio.sleep(0.3)
        assert not reloading.done() and repo.get("a").engine is not new and not new.stopped
        await asyncio.wait_for(repo.shutdown(), 10)  # the grace period is over: no drain
        assert new.stopped and new.stop_reason == ("model 'a' version 1 was unloaded: the "
                                                   "server is shutting down")
        await asyncio.wait_for(reloading, 10)

    asyncio.run(main())


def test_a_dead_engine_s_error_reaches_the_refusals(tmp_path: Path) -> None:
    _model(tmp_path, "a", [1])

    async def main() -> None:
        repo = ModelRepository(tmp_path, "explicit", ["a"], engine_factory=_stub_factory)
        await repo.start()
        repo.get("a").engine.dead = "tensor-parallel worker rank 1 (pid 42) was killed"
        for version, message in (
                ("", "Request for unknown model: 'a' has no available versions: version 1 "
                     "failed: tensor-parallel worker rank 1 (pid 42) was killed"),
                ("1", "Request for unknown model: 'a' version 1 is not at ready state: "
                      "tensor-parallel worker rank 1 (pid 42) was killed")):
            with pytest.raises(RepositoryError) as e:
                repo.get("a", version)
            assert e.value.code == grpc.StatusCode.UNAVAILABLE and e.value.message == message
        await repo.shutdown()

    asyncio.run(main())


# ---- the real server --------------------------------------------------------------------


def _repository(root: Path) -> Path:
    for name, decoupled in ((MODEL, True), (PLAIN, False)):
        # The embedded file's own blocks: the fastest setting, so long requests cost little.
        add_default_model(root, name, {"model": "default", "dtype": "float32",
                                       "quantization": "gguf", "max_model_len": 2048,
                                       "kv_cache_memory_bytes": 128 * 2**20,
                                       "enforce_eager": True}, decoupled)
    return root


def _serve(root: Path, grace: int) -> ServerHandle:
    return start_server(_repository(root), "--model-control-mode", "explicit", "--load-model",
                        MODEL, "--load-model", PLAIN, "--grace-period", str(grace))


@pytest.fixture(scope="module")
def patient(tmp_path_factory: pytest.TempPathFactory) -> Iterator[ServerHandle]:
    """A grace period no request here outlasts: unloads let everything finish."""
    handle = _serve(tmp_path_factory.mktemp("drain"), 600)
    yield handle
    handle.stop()


GRACE = 3


@pytest.fixture(scope="module")
def hasty(tmp_path_factory: pytest.TempPathFactory) -> Iterator[ServerHandle]:
    """A grace period that 2000 tokens outlast on any CPU."""
    handle = _serve(tmp_path_factory.mktemp("cut"), GRACE)
    yield handle
    handle.stop()


@dataclass
class _Stream:
    """One request on a stream of its own; the callback thread fills it."""

    client: grpcclient.InferenceServerClient
    results: list[Any] = field(default_factory=list)
    errors: list[InferenceServerException] = field(default_factory=list)
    final_at: float | None = None

    def callback(self, result: Any, error: InferenceServerException | None) -> None:
        if error is not None:
            self.errors.append(error)
        else:
            self.results.append(result)
            if is_final(result):
                self.final_at = time.monotonic()

    @property
    def tokens(self) -> int:
        return sum(int(r.as_numpy("num_output_tokens")[0]) for r in self.results)

    def close(self) -> None:
        self.client.stop_stream()
        self.client.close()


def _stream(server: ServerHandle, max_tokens: int, request_id: str) -> _Stream:
    stream = _Stream(grpcclient.InferenceServerClient(server.grpc_url))
    stream.client.start_stream(callback=stream.callback)
    stream.client.async_stream_infer(MODEL, llm_inputs(PROMPT, max_tokens, params={
        "ignore_eos": True}, return_num_output_tokens=True), request_id=request_id)
    _wait(lambda: bool(stream.results or stream.errors), "the stream's first response")
    assert not stream.errors, stream.errors
    return stream


class _Call:
    """A blocking call on a thread of its own: its result or error, when it ended."""

    def __init__(self, function: Callable[[], Any]) -> None:
        self.result: Any = None
        self.error: BaseException | None = None
        self.ended_at: float | None = None
        self._function = function
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()

    def _run(self) -> None:
        try:
            self.result = self._function()
        except BaseException as e:
            self.error = e
        self.ended_at = time.monotonic()

    def join(self) -> float:
        """Waits for the call to return; when it did."""
        self._thread.join(MARGIN)
        assert self.ended_at is not None, "the call did not return"
        return self.ended_at


def _client_call(server: ServerHandle, method: str, *args: Any, **kwargs: Any) -> _Call:
    """``client.method(*args, **kwargs)`` on a thread, with a client of its own."""
    def run() -> Any:
        client = grpcclient.InferenceServerClient(server.grpc_url)
        try:
            return getattr(client, method)(*args, **kwargs)
        finally:
            client.close()
    return _Call(run)


def _unary(server: ServerHandle, max_tokens: int) -> _Call:
    """A unary request on the plain model, once it runs in the engine."""
    call = _client_call(server, "infer", PLAIN, llm_inputs(
        PROMPT, max_tokens, stream=False, params={"ignore_eos": True},
        return_num_output_tokens=True), request_id="unary")
    gauge = f'pagedserve_requests_running{{model="{PLAIN}",version="1"}}'
    _wait(lambda: server.metrics().get(gauge, 0) >= 1 or call.ended_at is not None,
          "the unary request runs")
    assert call.ended_at is None, call.error
    return call


def _wait(condition: Callable[[], bool], what: str) -> None:
    deadline = time.monotonic() + MARGIN
    while not condition():
        assert time.monotonic() < deadline, f"no {what} within {MARGIN} s"
        time.sleep(0.02)


def _state(server: ServerHandle, name: str) -> tuple[str, str]:
    client = grpcclient.InferenceServerClient(server.grpc_url)
    try:
        (row,) = [m for m in client.get_model_repository_index().models if m.name == name]
        return row.state, row.reason
    finally:
        client.close()


def _refused(server: ServerHandle) -> None:
    """New requests for the unloading models get Triton's answer for a model without a ready
    version: in-band on a stream, UNAVAILABLE for a unary call."""
    client = grpcclient.InferenceServerClient(server.grpc_url)
    try:
        assert not client.is_server_ready()
        assert not client.is_model_ready(MODEL) and not client.is_model_ready(PLAIN)
        with pytest.raises(InferenceServerException) as e:
            client.infer(PLAIN, llm_inputs("Hi", 2, stream=False))
        assert e.value.status() == "StatusCode.UNAVAILABLE"
        assert e.value.message() == f"Request for unknown model: '{PLAIN}' has no available " \
                                    "versions"
        late: queue.Queue[tuple[Any, Any]] = queue.Queue()
        client.start_stream(callback=lambda result, error: late.put((result, error)))
        client.async_stream_infer(MODEL, llm_inputs("Hi", 2), request_id="late")
        result, error = late.get(timeout=MARGIN)
        assert result is None
        assert error.message() == f"Request for unknown model: '{MODEL}' has no available " \
                                  "versions"
        client.stop_stream()
    finally:
        client.close()


def _unload_both(server: ServerHandle) -> tuple[_Call, _Call]:
    unloads = (_client_call(server, "unload_model", MODEL),
               _client_call(server, "unload_model", PLAIN))
    _wait(lambda: _state(server, MODEL)[0] != "READY" and _state(server, PLAIN)[0] != "READY",
          "the unloads begin")
    return unloads


@pytest.mark.slow
def test_unload_lets_the_requests_in_flight_finish(patient: ServerHandle) -> None:
    stream = _stream(patient, 600, "streaming")
    unary = _unary(patient, 600)
    try:
        unloads = _unload_both(patient)
        assert _state(patient, MODEL) == _state(patient, PLAIN) == ("UNLOADING", "")
        assert stream.final_at is None and unary.ended_at is None, \
            "a request ended before the probes: lengthen it"
        _refused(patient)

        unloaded = [unload.join() for unload in unloads]
        assert all(unload.error is None for unload in unloads), [u.error for u in unloads]
        # Both requests ran to their end, every token, before their unloads returned.
        assert not stream.errors, stream.errors
        assert stream.final_at is not None and stream.final_at <= unloaded[0]
        assert stream.tokens == 600
        assert unary.join() <= unloaded[1] and unary.error is None, unary.error
        assert int(unary.result.as_numpy("num_output_tokens")[0]) == 600
        assert _state(patient, MODEL) == _state(patient, PLAIN) == ("UNAVAILABLE", "unloaded")
        log = patient.log()
        assert f"successfully unloaded '{MODEL}' version 1" in log
        assert f"successfully unloaded '{PLAIN}' version 1" in log
        assert "cutting" not in log
    finally:
        stream.close()
        client = grpcclient.InferenceServerClient(patient.grpc_url)
        client.load_model(MODEL)
        client.load_model(PLAIN)
        client.close()


@pytest.mark.slow
def test_a_load_during_the_drain_serves_at_once_and_a_reload_drains_too(
        patient: ServerHandle) -> None:
    client = grpcclient.InferenceServerClient(patient.grpc_url)
    old = _stream(patient, 800, "old")  # outlasts a load of the model beside it
    try:
        unloading = _client_call(patient, "unload_model", MODEL)
        _wait(lambda: _state(patient, MODEL)[0] == "UNLOADING", "the unload begins")
        client.load_model(MODEL)  # the new engine serves beside the old one, still draining
        assert client.is_model_ready(MODEL)
        fresh = _stream(patient, 4, "fresh")
        _wait(lambda: fresh.final_at is not None or bool(fresh.errors), "the fresh request")
        assert not fresh.errors and fresh.tokens == 4, fresh.errors
        fresh.close()
        assert old.final_at is None, "the old stream ended before the load: lengthen it"
        unloading.join()
        assert unloading.error is None and not old.errors, (unloading.error, old.errors)
        assert old.tokens == 800
        assert _state(patient, MODEL) == ("READY", "")  # the load's version, not "unloaded"
    finally:
        old.close()

    # A reload (a load of the version serving) drains the old engine the same way.
    running = _stream(patient, 400, "reloaded")
    try:
        client.load_model(MODEL)
        assert not running.errors, running.errors
        # It finished, every token, before the load returned.
        assert running.final_at is not None and running.tokens == 400
        assert client.is_model_ready(MODEL)
    finally:
        running.close()
        client.close()


@pytest.mark.slow
def test_unload_cuts_what_the_grace_period_cannot_finish(hasty: ServerHandle) -> None:
    stream = _stream(hasty, 2000, "long")
    unary = _unary(hasty, 2000)
    try:
        began = time.monotonic()
        unloads = _unload_both(hasty)
        for unload in unloads:
            assert unload.join() - began >= GRACE and unload.error is None, unload.error
        _wait(lambda: bool(stream.errors), "the stream's error")
        (error,) = stream.errors
        assert error.message() == (f"model '{MODEL}' version 1 was unloaded: the request did "
                                   f"not finish within the {GRACE} s an unload waits for "
                                   "requests in flight")
        assert stream.results and stream.final_at is None and stream.tokens < 2000
        unary.join()
        failure = unary.error
        assert isinstance(failure, InferenceServerException), failure
        assert failure.status() == "StatusCode.UNAVAILABLE"
        assert failure.message() == (f"model '{PLAIN}' version 1 was unloaded: the request did "
                                     f"not finish within the {GRACE} s an unload waits for "
                                     "requests in flight")
        assert _state(hasty, MODEL) == _state(hasty, PLAIN) == ("UNAVAILABLE", "unloaded")
        log = hasty.log()
        assert f"unloading '{MODEL}' version 1: cutting 1 requests still in flight" in log
        assert f"unloading '{PLAIN}' version 1: cutting 1 requests still in flight" in log
    finally:
        stream.close()
