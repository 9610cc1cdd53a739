"""``python -m backend serve``: the server's command line (Triton-style flags)."""

from __future__ import annotations

import argparse
import asyncio
import logging
from pathlib import Path

from backend.server.app import ServeOptions, serve

DEFAULT_REPOSITORY = Path(__file__).resolve().parents[2] / "model_repository"


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--model-repository", type=Path, default=DEFAULT_REPOSITORY,
                        help="model repository folder (default: the repo's model_repository/)")
    parser.add_argument("--host", default="0.0.0.0", help="address to bind (default 0.0.0.0)")
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
                        help="seconds in-flight requests may take to finish after SIGTERM")
    parser.add_argument("--max-message-bytes", type=int, default=2**31 - 1,
                        help="largest gRPC message accepted or sent")
    parser.add_argument("--log-verbose", action="store_true", help="debug logging")


def run(args: argparse.Namespace) -> int:
    logging.basicConfig(level=logging.DEBUG if args.log_verbose else logging.INFO,
                        format="%(asctime)s %(levelname).1s %(name)s] %(message)s")
    options = ServeOptions(
        model_repository=args.model_repository, host=args.host, grpc_port=args.grpc_port,
        http_port=args.http_port, metrics_port=args.metrics_port,
        model_control_mode=args.model_control_mode, load_models=tuple(args.load_model),
        poll_secs=args.repository_poll_secs, grace_period=args.grace_period,
        max_message_bytes=args.max_message_bytes)
    return asyncio.run(serve(options))
