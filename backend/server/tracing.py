"""Where the server's spans go and which requests get them: Triton's flags and ``OTEL_*``.

Tracing is on when ``--trace-config level=`` names a level other than ``OFF``, or when the
standard OpenTelemetry variables ask for an exporter (``OTEL_TRACES_EXPORTER`` = ``otlp`` or
``console``, or an ``OTEL_EXPORTER_OTLP_[TRACES_]ENDPOINT``), in which case every request is
traced unless ``rate=`` says otherwise. The exporter follows the variables:
``OTEL_EXPORTER_OTLP_[TRACES_]PROTOCOL`` ``grpc`` or ``http/protobuf`` (the default, as the
specification and Triton have it), endpoints, headers, ``OTEL_BSP_*`` batching,
``OTEL_TRACES_SAMPLER[_ARG]``, ``OTEL_SERVICE_NAME`` and ``OTEL_RESOURCE_ATTRIBUTES``; Triton's
``opentelemetry,url=`` and ``opentelemetry,resource=`` flags override the endpoint and add
resource attributes. Spans leave through a batch span processor, flushed when an engine stops
and when the server exits, each time for ``FLUSH_SECONDS`` at most (``engine/tracing.py``).
"""

from __future__ import annotations

import logging
import os
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field

from opentelemetry.sdk.resources import Resource
from opentelemetry.sdk.trace import TracerProvider
from opentelemetry.sdk.trace.export import BatchSpanProcessor, ConsoleSpanExporter, SpanExporter

from pagedserve.engine.stats import EngineObserver
from pagedserve.engine.tracing import FLUSH_SECONDS, EngineTracer, TraceSettings, flush_spans

log = logging.getLogger(__name__)

LEVELS = ("OFF", "TIMESTAMPS", "TENSORS")
_EXPORTERS = ("otlp", "console", "none")
_PROTOCOLS = ("grpc", "http/protobuf")


class TraceConfigError(ValueError):
    """A ``--trace-config`` flag or ``OTEL_*`` variable the server cannot honour."""


@dataclass
class TraceConfig:
    """The trace settings of the command line, before any exporter exists."""

    level: str | None = None  # None: not given (OFF unless the environment asks for traces)
    rate: int | None = None
    count: int = -1
    url: str | None = None
    resource: dict[str, str] = field(default_factory=dict)


def parse_trace_config(values: Sequence[str]) -> TraceConfig:
    """Triton's ``--trace-config`` values: ``level=``, ``rate=``, ``count=``, ``mode=``,
    ``opentelemetry,url=`` and ``opentelemetry,resource=key=value``."""
    config = TraceConfig()
    for value in values:
        section, _, setting = value.rpartition(",")
        key, eq, item = setting.partition("=")
        if not eq or section not in ("", "opentelemetry", "triton"):
            raise TraceConfigError(f"--trace-config option format is "
                                   f"'[<mode>,]<setting>=<value>'. Got {value}")
        if section == "triton":
            raise TraceConfigError("--trace-config: pagedserve traces with OpenTelemetry "
                                   f"only; 'triton,' settings are not supported ({value})")
        if key == "mode":
            if item != "opentelemetry":
                raise TraceConfigError(f"--trace-config mode={item}: only mode=opentelemetry "
                                       "is supported")
        elif key == "level":
            config.level = check_level([item])
        elif key == "rate":
            config.rate = check_int("rate", item, minimum=1)
        elif key == "count":
            config.count = check_int("count", item, minimum=-1)
        elif key == "url" and section == "opentelemetry":
            config.url = item if "://" in item else f"http://{item}"
        elif key == "resource" and section == "opentelemetry":
            name, eq, attribute = item.partition("=")
            if not eq or not name:
                raise TraceConfigError(f"--trace-config opentelemetry,resource= takes "
                                       f"key=value, got {item!r}")
            config.resource[name] = attribute
        else:
            raise TraceConfigError(f"--trace-config: unknown setting {setting!r}")
    return config


def check_level(values: Sequence[str]) -> str:
    """One trace level of Triton's (``TIMESTAMPS`` and ``TENSORS`` both trace here)."""
    levels = [v.upper() for v in values]
    if not levels or any(v not in LEVELS for v in levels):
        raise TraceConfigError(f"trace_level must be one of {', '.join(LEVELS)}, "
                               f"got {list(values)}")
    return "OFF" if "OFF" in levels else levels[0]


def check_int(name: str, value: str, minimum: int) -> int:
    try:
        number = int(value)
    except ValueError:
        raise TraceConfigError(f"trace_{name} must be an integer, got {value!r}") from None
    if number < minimum:
        raise TraceConfigError(f"trace_{name} must be at least {minimum}, got {number}")
    return number


def _exporter(env: Mapping[str, str], url: str | None) -> SpanExporter | None:
    name = env.get("OTEL_TRACES_EXPORTER", "otlp").strip().lower()
    if name not in _EXPORTERS:
        raise TraceConfigError(f"OTEL_TRACES_EXPORTER must be one of {', '.join(_EXPORTERS)}, "
                               f"got {name!r}")
    if name == "none":
        return None
    if name == "console":
        return ConsoleSpanExporter()
    protocol = (env.get("OTEL_EXPORTER_OTLP_TRACES_PROTOCOL")
                or env.get("OTEL_EXPORTER_OTLP_PROTOCOL") or "http/protobuf").strip()
    if protocol not in _PROTOCOLS:
        raise TraceConfigError(f"OTEL_EXPORTER_OTLP_TRACES_PROTOCOL must be one of "
                               f"{', '.join(_PROTOCOLS)}, got {protocol!r}")
    if protocol == "grpc":
        from opentelemetry.exporter.otlp.proto.grpc.trace_exporter import (
            OTLPSpanExporter as GrpcExporter,
        )
        return GrpcExporter(endpoint=url) if url else GrpcExporter()
    from opentelemetry.exporter.otlp.proto.http.trace_exporter import (
        OTLPSpanExporter as HttpExporter,
    )
    # Triton's url is the whole traces URL, as OTEL_EXPORTER_OTLP_TRACES_ENDPOINT is.
    return HttpExporter(endpoint=url) if url else HttpExporter()


def _wanted_by_env(env: Mapping[str, str]) -> bool:
    exporter = env.get("OTEL_TRACES_EXPORTER", "").strip().lower()
    if exporter:
        return exporter != "none"
    return bool(env.get("OTEL_EXPORTER_OTLP_ENDPOINT")
                or env.get("OTEL_EXPORTER_OTLP_TRACES_ENDPOINT"))


class ServerTracing:
    """The server's tracer provider and live trace settings.

    ``settings`` are Triton's global trace settings; a model's own (``TraceSetting`` with a
    model name) live in ``model_settings`` and are what that model's engines read.
    """

    def __init__(self, config: TraceConfig, env: Mapping[str, str] | None = None) -> None:
        env = os.environ if env is None else env
        by_env = _wanted_by_env(env)
        level = config.level or ("TIMESTAMPS" if by_env else "OFF")
        # Triton samples 1 in 1000 by default; asked for by the environment alone, every
        # request is traced and OTEL_TRACES_SAMPLER does any sampling.
        rate = config.rate or (1 if by_env and config.level is None else 1000)
        self.settings = TraceSettings(level, rate, config.count)
        self.model_settings: dict[str, TraceSettings] = {}
        # Built even while the level is OFF, so TraceSetting can turn tracing on at run time
        # (to Triton's default OTLP/HTTP endpoint, as tritonserver would); until then the
        # engines only check the level.
        attributes: dict[str, str] = dict(config.resource)
        named = "OTEL_SERVICE_NAME" in env or "service.name=" in env.get(
            "OTEL_RESOURCE_ATTRIBUTES", "")
        if not named:  # the environment's name wins over the default
            attributes.setdefault("service.name", "pagedserve")
        # No shutdown of its own at exit: ``shutdown`` does it, bounded; the SDK's, unbounded,
        # would wait on an unreachable collector after the server has stopped.
        self.provider = TracerProvider(resource=Resource.create(attributes),
                                       shutdown_on_exit=False)
        exporter = _exporter(env, config.url)
        if exporter is not None:
            self.provider.add_span_processor(BatchSpanProcessor(exporter))

    def settings_for(self, model_name: str) -> TraceSettings:
        """The settings a model's engines read: its own once it has some, else the global."""
        return self.model_settings.setdefault(
            model_name, TraceSettings(self.settings.level, self.settings.rate,
                                      self.settings.count))

    def observers(self, model_name: str, version: int) -> list[EngineObserver]:
        """The engine tracer of a model version."""
        return [EngineTracer(self.provider, self.settings_for(model_name), model_name,
                             str(version))]

    def shutdown(self) -> None:
        """Exports what is still buffered, for ``FLUSH_SECONDS`` at most; the server is
        exiting."""
        flush_spans(self.provider, FLUSH_SECONDS, final=True)
