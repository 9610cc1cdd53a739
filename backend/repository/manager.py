"""Model lifecycle over a repository folder: load, unload, poll, and look-ups by name/version.

Each served version owns one ``AsyncEngine`` (its own weights and KV cache). Loading runs in a
worker thread so the server keeps answering while weights load. States and reasons follow
Triton's ``RepositoryIndex``: ``READY``, ``UNAVAILABLE`` (with the load error or ``unloaded``),
``LOADING``, ``UNLOADING``.

A version that stops being served (an unload, the old version of a reload, a model gone from
the folder in poll mode) drains as Triton's do: at once it is not ready and new requests for it
are refused with Triton's answer for a model without a ready version, while the requests already
in flight on it run to their end (their final responses included); then its engine stops. The
wait is bounded (``drain_seconds``, see ``DRAIN_SECONDS``): the requests still running then end
with an error that names the unload. Drains run outside the model's lock, so a load of the
same model meanwhile goes ahead and serves its new engines as soon as they are up, beside the
old ones still draining (Triton's choice too: no downtime beyond the load itself).

Names from clients are matched against the repository folder's own entries (``names.py``) before
anything is read, and every unknown or invalid name gets Triton's answer for an unknown model,
the same whatever exists on disk.
"""

from __future__ import annotations

import asyncio
import copy
import logging
import re
import threading
from collections.abc import Callable, Iterable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import grpc

from pagedserve.config import EngineConfig
from pagedserve.engine.async_engine import AsyncEngine
from pagedserve.engine.stats import EngineObserver
from pagedserve.lora_request import LoRARequest
from pagedserve.protocol import model_config_pb2 as mc
from pagedserve.repository.engine_args import check_kv_cache_total, engine_config
from pagedserve.repository.errors import RepositoryError, hide_paths
from pagedserve.repository.lora import AdapterTable, adapter_table
from pagedserve.repository.model_config import load_config
from pagedserve.repository.names import model_folder, model_names, shown
from pagedserve.repository.paths import redact
from pagedserve.repository.statistics import ModelStats
from pagedserve.repository.versions import available_versions, select_versions

log = logging.getLogger(__name__)

CONTROL_MODES = ("none", "explicit", "poll")
# How long a version that stops being served lets its requests in flight run on before the rest
# are cut. The server passes its --grace-period (default 30 s), the bound SIGTERM gives requests
# in flight too, so one setting says how long a request may outlive its model; Triton's unload
# waits for in-flight requests without a bound of its own, and its --exit-timeout-secs (also
# 30 s by default) bounds that wait at exit.
DRAIN_SECONDS = 30.0
_DRAIN_POLL_S = 0.05  # how often a drain looks whether its requests have ended
# A model version as RPCs write it: "" / "-1" (latest) or a number, ASCII digits only.
_VERSION = re.compile(r"-?[0-9]{1,19}")


def unknown_model(name: str) -> RepositoryError:
    """Triton's answer to a look-up of a model it does not serve."""
    return RepositoryError(grpc.StatusCode.NOT_FOUND,
                           f"Request for unknown model: '{shown(name)}' is not found")


def _unknown_to_load(name: str) -> RepositoryError:
    # Triton 2.51's status and wording for a name its repository has no folder for.
    return RepositoryError(grpc.StatusCode.INTERNAL,
                           f"failed to load '{shown(name)}', failed to poll from model "
                           "repository")


@dataclass
class ModelVersion:
    """One loaded, servable version of a model."""

    name: str
    version: int
    config: mc.ModelConfig
    engine: AsyncEngine
    # A private copy of the engine's tokenizer for the event loop (decoding logprob tokens):
    # the engine's own tokenizer belongs to its core thread.
    tokenizer: Any
    stats: ModelStats = field(default_factory=ModelStats)
    # Its LoRA adapters by name (``repository/lora.py``); None when LoRA is not enabled.
    loras: AdapterTable | None = None

    @property
    def decoupled(self) -> bool:
        return self.config.model_transaction_policy.decoupled


@dataclass
class _VersionState:
    state: str
    reason: str = ""
    model: ModelVersion | None = None

    def current(self) -> tuple[str, str]:
        """State and reason now: a READY version whose engine died (a tensor-parallel worker
        gone) is UNAVAILABLE, with the engine's error as the reason."""
        failure = self.failure()
        if failure is not None:
            return "UNAVAILABLE", failure
        return self.state, self.reason

    @property
    def ready(self) -> bool:
        return self.current()[0] == "READY"

    def failure(self) -> str | None:
        """The engine's error when this version was loaded and its engine has died since."""
        if self.state == "READY" and self.model is not None:
            return self.model.engine.failure()
        return None


@dataclass
class _ModelState:
    versions: dict[int, _VersionState] = field(default_factory=dict)
    config: mc.ModelConfig | None = None
    signature: tuple[Any, ...] = ()
    lock: asyncio.Lock = field(default_factory=asyncio.Lock)
    # The drains of versions no longer served (``ModelRepository._retire``), until they end.
    draining: set[asyncio.Task[None]] = field(default_factory=set)


EngineFactory = Callable[[EngineConfig, Sequence[EngineObserver]], tuple[AsyncEngine, Any]]
# (model name, version) -> the observers (tracing, metrics) its engine reports to.
ObserverFactory = Callable[[str, int], Sequence[EngineObserver]]


def build_engine(config: EngineConfig, observers: Sequence[EngineObserver] = ()
                 ) -> tuple[AsyncEngine, Any]:
    """Loads the weights and starts an engine; returns it with a tokenizer copy for the loop."""
    from pagedserve.engine.core import EngineCore

    core = EngineCore(config, observers=observers)
    tokenizer = copy.deepcopy(core.tokenizer)  # before the core thread starts using its own
    return AsyncEngine(core), tokenizer


def _signature(model_dir: Path) -> tuple[Any, ...]:
    """What poll mode watches: the config file and the version folders' files."""
    parts: list[Any] = []
    for path in sorted(model_dir.rglob("*")):
        if path.is_file():
            stat = path.stat()
            parts.append((str(path.relative_to(model_dir)), stat.st_mtime_ns, stat.st_size))
    return tuple(parts)


class ModelRepository:
    """The models of one repository folder and their lifecycle under a control mode."""

    def __init__(self, root: Path, control_mode: str = "none",
                 startup_models: list[str] | None = None,
                 engine_factory: EngineFactory = build_engine,
                 observer_factory: ObserverFactory | None = None,
                 drain_seconds: float = DRAIN_SECONDS) -> None:
        if control_mode not in CONTROL_MODES:
            raise ValueError(f"model control mode must be one of {CONTROL_MODES}, "
                             f"got {control_mode!r}")
        self.root = root
        self.control_mode = control_mode
        self.startup_models = startup_models or []
        self._factory = engine_factory
        self._observers = observer_factory
        self.drain_seconds = drain_seconds
        self._stopping = False  # shutdown has begun: drains end at once
        self._models: dict[str, _ModelState] = {}
        # Model name -> the (adapter name, folder) pairs ``--lora-modules`` attach to it: every
        # load of the model serves them beside its versions' multi_lora.json.
        self.lora_modules: dict[str, list[tuple[str, str]]] = {}
        # Engines being built right now, each on a thread that cannot be interrupted; counted
        # on that thread, since the request that began a load may be cancelled before it ends.
        self._building = 0
        self._building_lock = threading.Lock()
        # The loads waiting on an engine built on its thread (each load() runs shielded).
        self._building_loads: set[asyncio.Task[Any]] = set()

    # ---- discovery -------------------------------------------------------------------------

    def model_names(self) -> list[str]:
        """Every model folder of the repository, loaded or not."""
        return model_names(self.root)

    async def start(self) -> None:
        """Loads the startup models of the control mode (failures leave them UNAVAILABLE)."""
        if self.control_mode == "explicit":
            names = self.model_names() if "*" in self.startup_models else self.startup_models
        else:
            names = self.model_names()
        for name in names:
            try:
                await self.load(name)
            except RepositoryError as e:
                log.error("failed to load '%s': %s", name, e.message)

    # ---- lifecycle -------------------------------------------------------------------------

    async def load(self, name: str, config_override: str | None = None) -> None:
        """(Re)loads every version the policy selects; the old versions serve until then, and
        drain once the new ones serve: the call returns when they have stopped.

        ``config_override`` is a client's JSON ``ModelConfig``: its engine parameters are held
        to the client's limits (paths inside the repository).

        A caller that goes away (a cancelled RPC) does not stop the load, as in Triton: it runs
        to its end, so no version is left LOADING and no engine built on its thread is lost.
        """
        loading = asyncio.ensure_future(self._load(name, config_override))
        # Its error is the caller's; a caller gone, it was logged already.
        loading.add_done_callback(lambda task: task.cancelled() or task.exception())
        await asyncio.shield(loading)

    async def _load(self, name: str, config_override: str | None) -> None:
        model_dir = model_folder(self.root, name)
        if model_dir is None:
            raise _unknown_to_load(name)
        state = self._models.setdefault(name, _ModelState())
        async with state.lock:
            await self._drop_failed(state)
            try:
                config = load_config(model_dir, config_override)
                versions = select_versions(config.version_policy, available_versions(model_dir))
                if not versions:
                    raise RepositoryError(grpc.StatusCode.INVALID_ARGUMENT,
                                          f"at least one version must be available under the "
                                          f"version policy of model '{name}'")
                client_root = self.root if config_override is not None else None
                settings = {v: engine_config(config, model_dir / str(v), client_root)
                            for v in versions}
                check_kv_cache_total(name, list(settings.values()))
                loras = {v: adapter_table(settings[v], model_dir / str(v), self.root, name,
                                          self.lora_modules.get(name, ()))
                         for v in versions}
                self._check_adapter_names(name, loras.values())
            except RepositoryError as e:
                if not any(s.state == "READY" for s in state.versions.values()):
                    state.versions = {0: _VersionState("UNAVAILABLE", e.message)}
                raise
            loaded: dict[int, _VersionState] = {}
            for version in versions:
                log.info("loading: %s:%d", name, version)
                old = state.versions.get(version)
                if old is None or old.model is None:
                    state.versions[version] = _VersionState("LOADING")
                building = asyncio.current_task()
                assert building is not None  # load() runs _load as a task of its own
                self._building_loads.add(building)
                try:
                    observers = (self._observers(name, version) if self._observers else ())
                    engine, tokenizer = await asyncio.to_thread(self._build, settings[version],
                                                                observers)
                except Exception as e:
                    for done in loaded.values():  # all or nothing: keep the old set serving
                        if done.model is not None:
                            await asyncio.to_thread(done.model.engine.shutdown)
                    log.error("failed to load '%s' version %d: %s", name, version, e)
                    message = (f"failed to load '{name}' version {version}: "
                               f"{hide_paths(redact(str(e), self.root))}")
                    if old is None or old.model is None:
                        state.versions[version] = _VersionState("UNAVAILABLE", message)
                    raise RepositoryError(grpc.StatusCode.INVALID_ARGUMENT, message) from e
                finally:
                    self._building_loads.discard(building)
                loaded[version] = _VersionState(
                    "READY", "", ModelVersion(name, version, config, engine, tokenizer,
                                              loras=loras[version]))
                log.info("successfully loaded '%s' version %d", name, version)
            previous = state.versions
            state.versions = loaded
            state.config = config
            state.signature = _signature(model_dir)
            drain = self._retire(state, [vs.model for vs in previous.values()
                                         if vs.model is not None], {})
        await _settled([drain])

    def _check_adapter_names(self, name: str, tables: Iterable[AdapterTable | None]) -> None:
        """An adapter name that another loaded model serves would make the OpenAI door's
        ``model`` ambiguous: refused."""
        for table in tables:
            for adapter in table.names() if table is not None else ():
                holder = self.adapter_holder(adapter, excluding=name)
                if holder is not None:
                    raise RepositoryError(grpc.StatusCode.INVALID_ARGUMENT,
                                          f"LoRA adapter '{shown(adapter)}' of model '{name}' is "
                                          f"served by model '{holder}' already")

    def adapter_holder(self, adapter: str, excluding: str = "") -> str | None:
        """The loaded model (other than ``excluding``) one of whose versions serves ``adapter``."""
        for other, state in sorted(self._models.items()):
            if other == excluding:
                continue
            for vs in state.versions.values():
                if vs.model is not None and vs.model.loras is not None \
                        and adapter in vs.model.loras:
                    return other
        return None

    def adapter(self, name: str) -> tuple[ModelVersion, LoRARequest] | None:
        """The latest ready version of the model that serves LoRA adapter ``name``, and the
        adapter; None when no ready version serves one of that name."""
        for model in sorted(self.all_ready(), key=lambda m: (m.name, -m.version)):
            found = model.loras.get(name) if model.loras is not None else None
            if found is not None:
                return model, found
        return None

    def _build(self, settings: EngineConfig,
               observers: Sequence[EngineObserver]) -> tuple[AsyncEngine, Any]:
        with self._building_lock:
            self._building += 1
        try:
            return self._factory(settings, observers)
        finally:
            with self._building_lock:
                self._building -= 1

    @property
    def loads_in_progress(self) -> int:
        """Engines whose construction has begun and not yet ended, on their threads."""
        with self._building_lock:
            return self._building

    @staticmethod
    async def _drop_failed(state: _ModelState) -> None:
        """Stops the engines that died (a tensor-parallel rank gone): a reload then treats
        their versions as absent, so they neither serve on if it fails nor hold the old
        error over the load's own."""
        for version, vs in list(state.versions.items()):
            failure = vs.failure()
            if failure is None or vs.model is None:
                continue
            state.versions[version] = _VersionState("UNAVAILABLE", failure)
            log.info("stopping the failed engine of '%s' version %d", vs.model.name, version)
            await asyncio.to_thread(vs.model.engine.shutdown)  # no request left to drain

    async def unload(self, name: str) -> None:
        """Unloads every version: ``UNLOADING`` at once (new requests refused), ``UNAVAILABLE``
        ``unloaded`` once the requests in flight have ended, or been cut after
        ``drain_seconds``, and the engines have stopped; the call returns then (Triton's returns
        at once: here its return means the memory is free).

        A name that was never loaded, valid or not, is nothing to unload: success, as Triton
        2.51 answers (so the answer tells nothing about the disk either).
        """
        state = self._models.get(name)
        if state is None:
            return
        async with state.lock:
            models: list[ModelVersion] = []
            markers: dict[int, _VersionState] = {}
            for version, vs in state.versions.items():
                if vs.model is not None:
                    models.append(vs.model)
                    markers[version] = _VersionState("UNLOADING")
                elif vs.state != "UNLOADING":  # an earlier unload's drain ends those
                    markers[version] = _VersionState("UNAVAILABLE", "unloaded")
            state.versions = {**state.versions, **markers}
            self._retire(state, models, {version: marker for version, marker in markers.items()
                                         if marker.state == "UNLOADING"})
            drains = list(state.draining)  # this one's, and any earlier one's still running
        await _settled(drains)

    def _retire(self, state: _ModelState, models: list[ModelVersion],
                markers: dict[int, _VersionState]) -> asyncio.Task[None] | None:
        """Starts the drain of ``models``, versions no longer served (called under
        ``state.lock``; the drain runs on without it). The ``markers`` (``UNLOADING``) that
        are still in place when it ends turn ``UNAVAILABLE`` ``unloaded``."""
        if not models:
            return None
        task = asyncio.create_task(self._drain(state, models, markers))
        state.draining.add(task)
        task.add_done_callback(state.draining.discard)
        return task

    async def _drain(self, state: _ModelState, models: list[ModelVersion],
                     markers: dict[int, _VersionState]) -> None:
        """Waits until no request is in flight on ``models`` (for ``drain_seconds`` at most,
        none once shutdown has begun), then stops their engines: a request still running ends
        with an error naming the unload."""
        loop = asyncio.get_running_loop()
        deadline = loop.time() + self.drain_seconds
        while (not self._stopping and loop.time() < deadline
               and any(m.engine.in_flight for m in models)):
            await asyncio.sleep(_DRAIN_POLL_S)
        for model in models:
            try:
                cut = model.engine.in_flight
                if cut:
                    log.warning("unloading '%s' version %d: cutting %d requests still in "
                                "flight", model.name, model.version, cut)
                await asyncio.to_thread(model.engine.shutdown,
                                        self._cut_reason(model.name, model.version, cut))
                log.info("successfully unloaded '%s' version %d", model.name, model.version)
            except Exception:  # one engine's failure to stop must not keep the others running
                log.exception("failed to stop the engine of '%s' version %d", model.name,
                              model.version)
        for version, marker in markers.items():
            if state.versions.get(version) is marker:  # not replaced by a load meanwhile
                state.versions[version] = _VersionState("UNAVAILABLE", "unloaded")

    def _cut_reason(self, name: str, version: int, cut: int) -> str:
        """The error of a request still running when its version's drain ends, or (none
        running: ``cut`` 0) of one that reaches the engine after it stopped, having looked the
        version up just before the unload."""
        unloaded = f"model '{name}' version {version} was unloaded"
        if self._stopping:
            return f"{unloaded}: the server is shutting down"
        if not cut:
            return unloaded
        return (f"{unloaded}: the request did not finish within the {self.drain_seconds:g} s "
                "an unload waits for requests in flight")

    async def poll_once(self) -> None:
        """Poll mode: loads new models, reloads changed ones, unloads removed ones."""
        names = set(self.model_names())
        for name in sorted(names):
            state = self._models.get(name)
            if state is None or state.signature != _signature(self.root / name):
                try:
                    await self.load(name)
                except RepositoryError as e:
                    log.error("poll: failed to load '%s': %s", name, e.message)
        for name in sorted(set(self._models) - names):
            await self.unload(name)
            del self._models[name]

    async def shutdown(self) -> None:
        """Stops every engine, without draining: the server's grace period has let requests
        finish before (``app.py``), and drains still running end at once."""
        self._stopping = True
        # Loads waiting on an engine still building are abandoned (its thread cannot be
        # stopped; app.py exits without waiting for it): they hold their models' locks.
        loads = list(self._building_loads)
        for task in loads:
            task.cancel()
        await asyncio.gather(*loads, return_exceptions=True)
        for name in list(self._models):
            await self.unload(name)

    # ---- look-ups --------------------------------------------------------------------------

    def index(self, ready_only: bool = False) -> list[tuple[str, str, str, str]]:
        """``(name, version, state, reason)`` rows as RepositoryIndex reports them."""
        rows: list[tuple[str, str, str, str]] = []
        for name in sorted(set(self.model_names()) | set(self._models)):
            state = self._models.get(name)
            if state is None:
                if not ready_only:
                    rows.append((name, "", "", ""))
                continue
            for version, vs in sorted(state.versions.items()):
                current, reason = vs.current()
                if ready_only and current != "READY":
                    continue
                rows.append((name, str(version) if version else "", current, reason))
        return rows

    def ready_versions(self, name: str) -> list[ModelVersion]:
        state = self._models.get(name)
        if state is None:
            return []
        return [vs.model for _, vs in sorted(state.versions.items())
                if vs.ready and vs.model is not None]

    def all_ready(self) -> list[ModelVersion]:
        return [m for name in sorted(self._models) for m in self.ready_versions(name)]

    def is_ready(self) -> bool:
        """Server readiness: every model that was asked to load is READY (strict readiness)."""
        return all(all(vs.ready for vs in s.versions.values()) or
                   all(vs.reason == "unloaded" for vs in s.versions.values())
                   for s in self._models.values())

    def failed_versions(self) -> list[tuple[str, int, str]]:
        """``(name, version, error)`` of each loaded version whose engine has died since (a
        tensor-parallel rank gone). Cheap (no I/O, no blocking: read per liveness probe, from
        the HTTP thread too); copies the dicts it walks, which the event loop may change."""
        return list(self._failed())

    def is_live(self) -> bool:
        """False while a loaded version's engine has died: nothing but an unload or a load
        brings it back, so the server asks to be restarted (its liveness probe fails)."""
        return next(self._failed(), None) is None

    def _failed(self) -> Iterator[tuple[str, int, str]]:
        for name, s in sorted(list(self._models.items())):
            for version, vs in sorted(list(s.versions.items())):
                failure = vs.failure()
                if failure is not None:
                    yield name, version, failure

    def get(self, name: str, version: str = "") -> ModelVersion:
        """The ready version asked for (latest ready when ``version`` is empty or -1).

        Refusals carry Triton's wording; where a version is out of service because its engine
        died (a tensor-parallel rank gone), the engine's error follows it, so that clients see
        why (``docs/tensor-parallel.md``).
        """
        state = self._models.get(name)  # only loaded names: never a path look-up
        if state is None:
            raise unknown_model(name)
        if version in ("", "-1"):
            ready = self.ready_versions(name)
            if not ready:
                dead = "; ".join(f"version {v} failed: {failure}"
                                 for v, vs in sorted(state.versions.items())
                                 if (failure := vs.failure()) is not None)
                raise RepositoryError(grpc.StatusCode.UNAVAILABLE,
                                      f"Request for unknown model: '{name}' has no available "
                                      f"versions{': ' + dead if dead else ''}")
            return ready[-1]
        if not _VERSION.fullmatch(version):  # int() would take " 2", "+2", "0_2", "٢"
            raise RepositoryError(grpc.StatusCode.INVALID_ARGUMENT,
                                  f"failed to parse model version '{shown(version)}' for model "
                                  f"'{name}'")
        number = int(version)
        vs = state.versions.get(number)
        if vs is None:
            raise RepositoryError(grpc.StatusCode.NOT_FOUND,
                                  f"Request for unknown model: '{name}' version {number} is "
                                  "not found")
        if not vs.ready or vs.model is None:
            failure = vs.failure()
            raise RepositoryError(grpc.StatusCode.UNAVAILABLE,
                                  f"Request for unknown model: '{name}' version {number} is "
                                  f"not at ready state{': ' + failure if failure else ''}")
        return vs.model


async def _settled(drains: Sequence[asyncio.Task[None] | None]) -> None:
    """Waits for the drains; cancelling the waiter (a client gone) leaves them running."""
    tasks = [task for task in drains if task is not None]
    if tasks:
        await asyncio.shield(asyncio.gather(*tasks))
