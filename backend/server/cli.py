"""``python -m pagedserve serve``: the server's command line (Triton-style flags)."""

from __future__ import annotations

import argparse
import asyncio
import logging
import os
from pathlib import Path

from pagedserve.repository.default import default_repository
from pagedserve.server.access import GRPC_HEADER_PREFIX, parse_restrictions
from pagedserve.server.app import DEFAULT_MAX_MESSAGE_BYTES, ServeOptions, serve
from pagedserve.server.http.listener import DEFAULT_MAX_BODY_BYTES, DEFAULT_MAX_CONNECTIONS
from pagedserve.server.lora_modules import parse_lora_modules
from pagedserve.server.tls import TlsOptions
from pagedserve.server.tracing import parse_trace_config

_MAX_GRPC_INT = 2**31 - 1  # gRPC's message-size options are C ints

log = logging.getLogger("pagedserve")


def _bool(text: str) -> bool:
    """Triton's boolean option values."""
    value = text.strip().lower()
    if value in ("true", "on", "1", "yes"):
        return True
    if value in ("false", "off", "0", "no"):
        return False
    raise argparse.ArgumentTypeError(f"expected true or false, got '{text}'")


def _add_tls(parser: argparse.ArgumentParser, proto: str, what: str) -> None:
    # Triton's switches take a value (--grpc-use-ssl=true); a bare switch means true.
    parser.add_argument(f"--{proto}-use-ssl", type=_bool, nargs="?", const=True, default=False,
                        metavar="BOOL", help=f"serve {what} over TLS")
    parser.add_argument(f"--{proto}-use-ssl-mutual", type=_bool, nargs="?", const=True,
                        default=False, metavar="BOOL",
                        help=f"TLS on {what} with client certificates signed by "
                             f"--{proto}-root-cert (implies --{proto}-use-ssl)")
    parser.add_argument(f"--{proto}-server-cert", type=Path, metavar="PEM",
                        help="server certificate (chain)")
    parser.add_argument(f"--{proto}-server-key", type=Path, metavar="PEM",
                        help="server private key (unencrypted)")
    parser.add_argument(f"--{proto}-root-cert", type=Path, metavar="PEM",
                        help="CA certificate(s) that client certificates must chain to")


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--model-repository", type=Path,
                        help="model repository folder (default: the checkout's "
                             "model_repository/, or the installed copy)")
    parser.add_argument("--host", default="0.0.0.0",
                        help="address to bind (default 0.0.0.0, as Triton; 127.0.0.1 keeps the "
                             "server local)")
    parser.add_argument("--grpc-port", type=int, default=8001)
    parser.add_argument("--http-port", type=int, default=8000,
                        help="health endpoints and /metrics; 0 disables")
    parser.add_argument("--metrics-port", type=int, default=8002,
                        help="/metrics (and health); 0 disables")
    parser.add_argument("--model-control-mode", choices=["none", "explicit", "poll"],
                        default="none")
    parser.add_argument("--load-model", action="append", default=[],
                        help="model to load at start in explicit mode ('*' for all); repeatable")
    parser.add_argument("--repository-poll-secs", type=float, default=15.0,
                        help="poll interval of --model-control-mode=poll")
    parser.add_argument("--grace-period", type=float, default=30.0,
                        help="seconds in-flight requests may take to finish after SIGTERM, "
                             "or after their model is unloaded")
    parser.add_argument("--max-message-bytes", type=int, default=DEFAULT_MAX_MESSAGE_BYTES,
                        help="largest gRPC message accepted or sent; larger ones get "
                             "RESOURCE_EXHAUSTED (default 64 MiB)")
    parser.add_argument("--grpc-max-concurrent-rpcs", type=int, default=1024,
                        help="RPCs in flight (streams included) beyond which new ones get "
                             "RESOURCE_EXHAUSTED; 0: no cap (default 1024)")
    parser.add_argument("--http-idle-timeout", type=float, default=30.0,
                        help="seconds an HTTP connection may take to send a request's header "
                             "(from its opening or the previous response, TLS handshake "
                             "included) or its body (default 30)")
    parser.add_argument("--http-max-input-size", type=int, default=DEFAULT_MAX_BODY_BYTES,
                        help="largest HTTP request body accepted, in bytes, after "
                             "decompression; larger ones get 413 (default 64 MiB)")
    parser.add_argument("--http-max-connections", type=int, default=DEFAULT_MAX_CONNECTIONS,
                        help="HTTP connections open at once beyond which new ones are answered "
                             "503 and closed (default 1024)")
    parser.add_argument("--api-key", default=os.environ.get("PAGEDSERVE_API_KEY"),
                        help="the OpenAI routes (/v1) need 'Authorization: Bearer <key>' "
                             "(default: $PAGEDSERVE_API_KEY; unset, they are open)")
    parser.add_argument("--lora-modules", nargs="+", action="extend", default=[],
                        metavar="name=path|JSON",
                        help="LoRA adapters for the model with LoRA enabled, as vLLM's: "
                             "name=path, or {\"name\": ..., \"path\": ..., "
                             "\"base_model_name\": ...} to name the model (needed when several "
                             "have LoRA enabled); repeatable (docs/http.md)")
    parser.add_argument("--allow-runtime-lora-updating", action="store_true",
                        default=os.environ.get("VLLM_ALLOW_RUNTIME_LORA_UPDATING", "0").strip()
                        .lower() in ("1", "true"),
                        help="serve POST /v1/load_lora_adapter and /v1/unload_lora_adapter "
                             "(default: $VLLM_ALLOW_RUNTIME_LORA_UPDATING, as vLLM)")
    _add_tls(parser, "grpc", "gRPC")
    _add_tls(parser, "http", "the HTTP and metrics ports")
    parser.add_argument("--grpc-restricted-protocol", action="append", default=[],
                        metavar="<protocol>[,<protocol>...]:<key>=<value>",
                        help="RPCs of these groups need the header "
                             f"'{GRPC_HEADER_PREFIX}<key>: <value>'; repeatable")
    parser.add_argument("--http-restricted-api", action="append", default=[],
                        metavar="<api>[,<api>...]:<key>=<value>",
                        help="HTTP routes of these groups need the header '<key>: <value>'; "
                             "repeatable")
    parser.add_argument("--trace-config", action="append", default=[],
                        metavar="[opentelemetry,]<setting>=<value>",
                        help="Triton's trace settings: level=OFF|TIMESTAMPS, rate=N (one "
                             "request in N), count=N, mode=opentelemetry, "
                             "opentelemetry,url=<OTLP/HTTP traces URL>, "
                             "opentelemetry,resource=<key>=<value>; repeatable. OTEL_* "
                             "variables configure the exporter (docs/observability.md)")
    parser.add_argument("--log-verbose", action="store_true", help="debug logging")


def _tls(args: argparse.Namespace, proto: str) -> TlsOptions | None:
    def path(name: str) -> Path | None:
        value = getattr(args, f"{proto}_{name.replace('-', '_')}")
        return None if value is None else Path(value)

    files = {name: path(name) for name in ("server-cert", "server-key", "root-cert")}
    mutual = bool(getattr(args, f"{proto}_use_ssl_mutual"))
    if not (getattr(args, f"{proto}_use_ssl") or mutual):
        given = [f"--{proto}-{name}" for name, value in files.items() if value is not None]
        if given:
            log.warning("%s ignored: TLS is off without --%s-use-ssl", ", ".join(given), proto)
        return None
    return TlsOptions(f"--{proto}", files["server-cert"], files["server-key"],
                      files["root-cert"], mutual)


def options_from(args: argparse.Namespace) -> ServeOptions:
    """``ServeOptions`` from parsed flags; ``ValueError`` names a malformed one."""
    if not 0 < args.max_message_bytes <= _MAX_GRPC_INT:
        raise ValueError(f"--max-message-bytes must be between 1 and {_MAX_GRPC_INT}")
    if args.grpc_max_concurrent_rpcs < 0:
        raise ValueError("--grpc-max-concurrent-rpcs must be 0 (no cap) or more")
    if not args.http_idle_timeout > 0:
        raise ValueError("--http-idle-timeout must be more than 0 seconds")
    if args.http_max_input_size < 1:
        raise ValueError("--http-max-input-size must be at least 1 byte")
    if args.http_max_connections < 1:
        raise ValueError("--http-max-connections must be at least 1")
    if args.api_key is not None and not args.api_key:
        raise ValueError("--api-key must not be empty")
    parse_trace_config(args.trace_config)  # refused here, before anything starts
    return ServeOptions(
        model_repository=args.model_repository or default_repository(), host=args.host,
        grpc_port=args.grpc_port,
        http_port=args.http_port, metrics_port=args.metrics_port,
        model_control_mode=args.model_control_mode, load_models=tuple(args.load_model),
        poll_secs=args.repository_poll_secs, grace_period=args.grace_period,
        max_message_bytes=args.max_message_bytes,
        grpc_max_concurrent_rpcs=args.grpc_max_concurrent_rpcs,
        grpc_tls=_tls(args, "grpc"), http_tls=_tls(args, "http"),
        http_idle_timeout=args.http_idle_timeout,
        http_max_input_size=args.http_max_input_size,
        http_max_connections=args.http_max_connections, api_key=args.api_key,
        lora_modules=parse_lora_modules(args.lora_modules),
        allow_runtime_lora_updating=args.allow_runtime_lora_updating,
        grpc_restrictions=parse_restrictions(args.grpc_restricted_protocol,
                                             "grpc-restricted-protocol", GRPC_HEADER_PREFIX,
                                             "protocol"),
        http_restrictions=parse_restrictions(args.http_restricted_api, "http-restricted-api",
                                             "", "api"),
        trace_config=tuple(args.trace_config))


def run(args: argparse.Namespace) -> int:
    logging.basicConfig(level=logging.DEBUG if args.log_verbose else logging.INFO,
                        format="%(asctime)s %(levelname).1s %(name)s] %(message)s")
    return asyncio.run(serve(options_from(args)))
