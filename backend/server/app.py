"""The server process: repository, gRPC service, HTTP endpoints, signals, shutdown.

TLS credentials, restricted protocol groups and the gRPC limits (message size, concurrent RPCs)
come from ``ServeOptions``; bad TLS files stop the start before any model loads.

SIGTERM/SIGINT: readiness turns false and new requests are refused with UNAVAILABLE (the gRPC
port stays open to say so); streams with requests in flight may finish within the grace period,
idle streams close at once, and the streams still running when it ends are cut (their last
writes take at most ``CUT_WRITE_SECONDS``); then the gRPC and HTTP servers and the engines stop
within ``STOP_SECONDS``, or the process exits without waiting for them, and the status is 0.
From the signal, the exit comes within grace period + ``CUT_WRITE_SECONDS`` + ``STOP_SECONDS``.
"""

from __future__ import annotations

import asyncio
import contextlib
import gc
import logging
import os
import signal
import sys
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

import grpc
from grpc_reflection.v1alpha import reflection
from prometheus_client import CollectorRegistry

from pagedserve.engine.stats import EngineObserver
from pagedserve.protocol import grpc_service_pb2 as pb
from pagedserve.protocol import grpc_service_pb2_grpc as pb_grpc
from pagedserve.protocol import health_pb2 as hpb
from pagedserve.protocol import health_pb2_grpc as hpb_grpc
from pagedserve.protocol._pool import POOL
from pagedserve.repository import ModelRepository
from pagedserve.server.access import RestrictedProtocols, Restriction
from pagedserve.server.health import HealthService
from pagedserve.server.http.app import HttpFront
from pagedserve.server.http.context import HttpContext
from pagedserve.server.http.listener import (
    DEFAULT_MAX_BODY_BYTES,
    DEFAULT_MAX_CONNECTIONS,
    HttpSettings,
)
from pagedserve.server.lora_modules import LoRAModule, attach_lora_modules
from pagedserve.server.metrics import MetricFamilies, RepositoryCollector, metrics_observers
from pagedserve.server.service import InferenceService
from pagedserve.server.state import SERVER_NAME, SERVER_VERSION, ServerState
from pagedserve.server.streaming import CUT, DRAIN
from pagedserve.server.tls import TlsOptions, grpc_credentials, ssl_context
from pagedserve.server.tracing import ServerTracing, parse_trace_config

log = logging.getLogger("pagedserve")

DEFAULT_MAX_MESSAGE_BYTES = 64 * 2**20
# Shutdown bounds, after the grace period: the cut streams' last writes, then everything else
# (gRPC server, HTTP endpoints, engines, trace export). Deployments budget both (docs/deploy.md).
CUT_WRITE_SECONDS = 2.0
STOP_SECONDS = 10.0


@dataclass
class ServeOptions:
    model_repository: Path
    host: str = "0.0.0.0"
    grpc_port: int = 8001
    http_port: int = 8000  # 0 disables
    metrics_port: int = 8002  # 0 disables; may equal http_port
    model_control_mode: str = "none"
    load_models: tuple[str, ...] = ()
    poll_secs: float = 15.0
    grace_period: float = 30.0
    # tritonserver allows INT32_MAX; a lower default refuses oversized requests with
    # RESOURCE_EXHAUSTED before gRPC buffers and parses them.
    max_message_bytes: int = DEFAULT_MAX_MESSAGE_BYTES
    grpc_max_concurrent_rpcs: int = 1024  # beyond it RESOURCE_EXHAUSTED; 0: no cap
    grpc_tls: TlsOptions | None = None
    http_tls: TlsOptions | None = None  # also the metrics port's
    http_idle_timeout: float = 30.0
    http_max_input_size: int = DEFAULT_MAX_BODY_BYTES
    http_max_connections: int = DEFAULT_MAX_CONNECTIONS
    api_key: str | None = None  # the OpenAI routes' bearer token
    grpc_restrictions: dict[str, Restriction] = field(default_factory=dict)
    http_restrictions: dict[str, Restriction] = field(default_factory=dict)
    trace_config: tuple[str, ...] = ()  # Triton's --trace-config values
    lora_modules: tuple[LoRAModule, ...] = ()  # vLLM's --lora-modules
    allow_runtime_lora_updating: bool = False  # /v1/load_lora_adapter, /v1/unload_lora_adapter


def _table(rows: Sequence[tuple[str, ...]], header: tuple[str, ...]) -> str:
    widths = [max(len(r[i]) for r in [header, *rows]) for i in range(len(header))]
    rule = "+" + "+".join("-" * (w + 2) for w in widths) + "+"
    def line(r: tuple[str, ...]) -> str:
        return "| " + " | ".join(c.ljust(w) for c, w in zip(r, widths)) + " |"
    return "\n".join([rule, line(header), rule, *(line(r) for r in rows), rule])


def _tls_note(tls: TlsOptions | None) -> str:
    return "" if tls is None else " (mutual TLS)" if tls.mutual else " (TLS)"


async def serve(options: ServeOptions) -> int:
    """Runs the server until SIGTERM/SIGINT; returns the exit status."""
    # TLS files first: a bad one must stop the server before any model loads.
    credentials = grpc_credentials(options.grpc_tls) if options.grpc_tls else None
    http = HttpSettings(tls=ssl_context(options.http_tls) if options.http_tls else None,
                        idle_timeout=options.http_idle_timeout,
                        restrictions=options.http_restrictions,
                        max_body_bytes=options.http_max_input_size,
                        max_connections=options.http_max_connections, api_key=options.api_key,
                        runtime_lora_updating=options.allow_runtime_lora_updating)
    tracing = ServerTracing(parse_trace_config(options.trace_config))
    state = ServerState()
    state.trace.update(trace_level=[tracing.settings.level],
                       trace_rate=[str(tracing.settings.rate)],
                       trace_count=[str(tracing.settings.count)], trace_mode=["opentelemetry"])
    # One registry for /metrics: engine observers write it, the repository collector joins it.
    registry = CollectorRegistry()
    families = MetricFamilies(registry)
    metrics = metrics_observers(families)

    def observers(name: str, version: int) -> list[EngineObserver]:
        return [*metrics(name, version), *tracing.observers(name, version)]

    repository = ModelRepository(options.model_repository, options.model_control_mode,
                                 list(options.load_models), observer_factory=observers,
                                 drain_seconds=options.grace_period)  # unloads' bound too
    registry.register(RepositoryCollector(repository))
    server = grpc.aio.server(
        interceptors=[RestrictedProtocols(options.grpc_restrictions)]
        if options.grpc_restrictions else None,
        options=[("grpc.max_send_message_length", options.max_message_bytes),
                 ("grpc.max_receive_message_length", options.max_message_bytes)],
        maximum_concurrent_rpcs=options.grpc_max_concurrent_rpcs or None)
    service = InferenceService(repository, state, tracing)
    pb_grpc.add_GRPCInferenceServiceServicer_to_server(service, server)
    hpb_grpc.add_HealthServicer_to_server(HealthService(repository, state), server)
    reflection.enable_server_reflection([
        pb.DESCRIPTOR.services_by_name["GRPCInferenceService"].full_name,
        hpb.DESCRIPTOR.services_by_name["Health"].full_name,
        reflection.SERVICE_NAME], server, pool=POOL)
    address = f"{options.host}:{options.grpc_port}"
    grpc_port = (server.add_secure_port(address, credentials) if credentials is not None
                 else server.add_insecure_port(address))
    if grpc_port == 0:
        log.error("failed to bind the gRPC port %d", options.grpc_port)
        return 1

    log.info("%s %s: model repository %s, control mode %s", SERVER_NAME, SERVER_VERSION,
             options.model_repository, options.model_control_mode)
    # The signal is heard from here on: a model still loading when it comes is abandoned (its
    # thread cannot be interrupted), and the exit is as prompt as after a load.
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    starting = asyncio.create_task(repository.start())
    await asyncio.wait([starting, asyncio.create_task(stop.wait())],
                       return_when=asyncio.FIRST_COMPLETED)
    if not starting.done():
        log.warning("Signal received while loading models: abandoning the loads")
        await server.stop(0)
        # The models loaded already may have traced: their spans go out, within the bound.
        await asyncio.to_thread(tracing.shutdown)
        _exit_now(0)
    starting.result()  # a failure to start is raised here
    if options.lora_modules:
        try:
            await attach_lora_modules(repository, options.lora_modules)
        except ValueError:  # the server does not start (exit status 2, the message said)
            await repository.shutdown()
            raise
    rows = [(n, v or "-", s or "UNLOADED", r) for n, v, s, r in repository.index()]
    log.info("\n%s", _table(rows, ("Model", "Version", "Status", "Reason")) if rows else
             "no models in the repository")
    engines = [(m.name, str(m.version), m.engine.core.summary()) for m in repository.all_ready()]
    if engines:
        log.info("\n%s", _table([(n, v, s.family, s.dtype, f"{s.kv_blocks} blocks",
                                  f"{s.kv_tokens} tokens") for n, v, s in engines],
                                ("Model", "Version", "Family", "Dtype", "KV cache", "KV tokens")))

    # What is loaded by now (libraries, models) lives as long as the server: frozen out of the
    # collector's sight, each collection walks only what requests allocate, not the whole heap
    # every step (vLLM freezes its engine the same way).
    gc.collect()
    gc.freeze()
    front = HttpFront(HttpContext(repository, state, service, registry, http), options.host,
                      options.http_port, options.metrics_port)
    await front.start()
    await server.start()
    log.info("Started GRPCInferenceService at %s:%d%s", options.host, grpc_port,
             _tls_note(options.grpc_tls))
    for kind, listener in front.listeners:
        log.info("Started %s at %s:%d%s", kind, options.host, listener.port,
                 _tls_note(options.http_tls))

    poller = None
    if options.model_control_mode == "poll":
        poller = asyncio.create_task(_poll(repository, options.poll_secs))
    await stop.wait()

    log.info("Signal received: draining (grace period %.0f s)", options.grace_period)
    deadline = loop.time() + options.grace_period
    state.draining = True
    for queue in list(state.streams):
        queue.put_nowait(DRAIN)
    if poller is not None:
        poller.cancel()
    # The gRPC server keeps answering while streams finish, so probes see "not ready" and new
    # requests get UNAVAILABLE rather than a refused connection; stopping it ends the rest.
    try:
        await asyncio.wait_for(state.no_streams.wait(), options.grace_period)
    except TimeoutError:
        log.warning("Grace period over: cutting %d streams",
                    len(state.streams) + len(state.http_requests))
        for queue in list(state.streams):
            queue.put_nowait(CUT)
        for task in list(state.http_requests):
            task.cancel()
        # Bounded: a moment for each cut request's error to be written before the server stops.
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(state.no_streams.wait(), CUT_WRITE_SECONDS)
    # What is left of the grace period is unary requests' (streams finished early); after it,
    # STOP_SECONDS bounds the rest. Blocking steps run in threads, so the bound holds for them.
    grace_left = max(deadline - loop.time(), 0)

    async def stop_all() -> None:
        await server.stop(grace_left)
        await front.stop()
        await repository.shutdown()
        # The last requests' spans, exported before the process exits.
        await asyncio.to_thread(tracing.shutdown)

    try:
        await asyncio.wait_for(stop_all(), grace_left + STOP_SECONDS)
    except TimeoutError:
        log.error("Shutdown took over %.0f s after the grace period: exiting without waiting "
                  "for the engines to stop", STOP_SECONDS)
        _exit_now(0)
    if repository.loads_in_progress:
        # A load still running on its thread (a model that never finishes loading): the
        # interpreter would wait for it at exit, for as long as it takes.
        log.warning("Server stopped; abandoning %d loads in progress",
                    repository.loads_in_progress)
        _exit_now(0)
    log.info("Server stopped")
    return 0


def _exit_now(status: int) -> None:
    """Exits at once: a step still running in a thread (an engine stopping) would otherwise
    hold the interpreter's exit, which waits for such threads."""
    logging.shutdown()
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(status)


async def _poll(repository: ModelRepository, interval: float) -> None:
    while True:
        await asyncio.sleep(interval)
        try:
            await repository.poll_once()
        except Exception:  # polling must never take the server down
            log.exception("repository poll failed")
