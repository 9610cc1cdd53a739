"""The engine-direct side of ``bench/serve.py``: a worker process driving ``AsyncEngine``.

It runs in its own process, as the server does, so that neither path shares an interpreter (its
GIL, its allocator) with the other path's engine or with the gRPC load generator: the two
phases differ only by the gRPC hop.

Protocol (JSON lines): the worker builds the engine with exactly the settings the server reads
for ``<repository>/<model>/1`` and prints ``{"ready": true}``; then for each line
``{"tag": str, "requests": [{"request_id", "prompt", "max_tokens"}, ...], "sequential": bool}``
on stdin it runs all requests concurrently (or one at a time) through ``AsyncEngine.generate``
(greedy, EOS ignored) and prints one result line; an empty line or EOF ends it.

    python -m pagedserve.bench.serve_direct --repository model_repository --model smollm2
"""

from __future__ import annotations

import argparse
import asyncio
import json
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np

from pagedserve import SamplingParams
from pagedserve.bench.throughput import ContentionMonitor
from pagedserve.engine.async_engine import AsyncEngine
from pagedserve.engine.core import EngineCore
from pagedserve.repository.engine_args import engine_config
from pagedserve.repository.model_config import load_config


def build_engine(repository: Path, model: str) -> AsyncEngine:
    """An engine with the settings the server reads for ``model`` version 1."""
    config = load_config(repository / model)
    return AsyncEngine(EngineCore(engine_config(config, repository / model / "1")))


async def run_workload(engine: AsyncEngine, tag: str, requests: list[dict[str, Any]],
                       sequential: bool = False) -> dict[str, Any]:
    """All requests at once (or one after another); per request the submission, first-text
    and final times."""

    async def one(req: dict[str, Any]) -> tuple[float, float | None, float, int]:
        params = SamplingParams(temperature=0, max_tokens=req["max_tokens"], ignore_eos=True)
        sent, first, tokens = time.perf_counter(), None, 0
        async for out in engine.generate(req["prompt"], params,
                                         request_id=f"{tag}-{req['request_id']}"):
            # Time to first token, as the gRPC client measures it.
            if first is None and any(out.delta_token_ids):
                first = time.perf_counter()
            tokens += sum(len(ids) for ids in out.delta_token_ids)
        return sent, first, time.perf_counter(), tokens

    monitor = ContentionMonitor()
    start = time.perf_counter()
    if sequential:
        results = [await one(r) for r in requests]
    else:
        results = await asyncio.gather(*(one(r) for r in requests))
    wall = max(done for _, _, done, _ in results) - start
    contention = monitor.stop()
    ttfts = [first - sent for sent, first, _, _ in results if first is not None]
    latencies = [done - sent for sent, _, done, _ in results]
    tokens = sum(n for *_, n in results)
    return {"path": "direct", "wall_s": wall, "output_tokens": tokens,
            "tokens_per_s": tokens / wall,
            "ttft_p50_s": float(np.percentile(ttfts, 50)),
            "ttft_p95_s": float(np.percentile(ttfts, 95)),
            "latency_p50_s": float(np.percentile(latencies, 50)),
            "ttfts_s": ttfts,
            "contention": {"wall_s": contention.wall_s, "ours_cpu_s": contention.own_cpu_s,
                           "others_cpu_s": contention.others_cpu_s,
                           "steal_s": contention.steal_s,
                           "others_fraction_of_machine": contention.others_fraction_of_machine}}


async def serve_commands(engine: AsyncEngine) -> None:
    loop = asyncio.get_running_loop()
    while True:
        line = await loop.run_in_executor(None, sys.stdin.readline)
        if not line.strip():
            return
        command = json.loads(line)
        result = await run_workload(engine, command["tag"], command["requests"],
                                    command.get("sequential", False))
        print(json.dumps(result), flush=True)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--repository", type=Path, required=True)
    parser.add_argument("--model", required=True)
    args = parser.parse_args(argv)
    engine = build_engine(args.repository, args.model)
    try:
        print(json.dumps({"ready": True}), flush=True)
        asyncio.run(serve_commands(engine))
    finally:
        engine.shutdown()
    return 0


if __name__ == "__main__":
    sys.exit(main())
