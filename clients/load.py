"""Async load generator over Triton's gRPC protocol (``tritonclient.grpc.aio``).

    python clients/load.py [--url 127.0.0.1:8001] [--model smollm2] [--requests 64]
        [--streams 16] [--concurrency 64] [--max-tokens 64] [--json]

Sends ``--requests`` streaming requests (tensors of Triton's vLLM backend) over ``--streams``
bidirectional ModelStreamInfer calls, at most ``--concurrency`` in flight at once, requests dealt
round-robin to the streams. Every request asks for exactly ``max_tokens`` tokens (``ignore_eos``)
so runs are comparable. Reports throughput (output tokens/s over the wall time from the first
send to the last final response), time to first token (send to the first response carrying
text) and request latency (send to the final response), p50/p95.

``run_load`` is the reusable entry point (``bench/serve.py`` drives it).
"""

from __future__ import annotations

import argparse
import asyncio
import json
import statistics
import sys
import time
from collections.abc import AsyncIterator, Sequence
from dataclasses import asdict, dataclass, field
from typing import Any

import numpy as np
import tritonclient.grpc as grpcclient
import tritonclient.grpc.aio as aioclient

DEFAULT_PROMPTS = (
    "Explain how a paged KV cache avoids memory fragmentation.",
    "Write a short poem about GPUs and batching.",
    "What is the difference between prefill and decode in LLM inference?",
    "List five uses of a hash map in everyday software.",
    "Describe the water cycle to a ten-year-old.",
    "Why do transformers need positional information?",
    "Summarize the plot of a detective story in three sentences.",
    "Give advice to someone learning to cook pasta.",
)


@dataclass(frozen=True)
class LoadRequest:
    """One request of the workload: its prompt and how many tokens to generate."""

    request_id: str
    prompt: str
    max_tokens: int


@dataclass
class RequestTiming:
    """What one request measured (``time.perf_counter`` seconds)."""

    sent_at: float = 0.0
    first_at: float | None = None
    done_at: float | None = None
    output_tokens: int = 0
    text: list[str] = field(default_factory=list)


@dataclass
class LoadReport:
    """Summary of a run; times in seconds."""

    num_requests: int
    streams: int
    concurrency: int
    wall_s: float
    output_tokens: int
    tokens_per_s: float
    ttft_p50_s: float
    ttft_p95_s: float
    latency_p50_s: float
    latency_p95_s: float
    ttfts_s: list[float]
    texts: dict[str, str]

    def summary(self) -> dict[str, Any]:
        """The report without the per-request lists (for printing and result files)."""
        out = asdict(self)
        del out["ttfts_s"], out["texts"]
        return out


class LoadError(RuntimeError):
    """The server answered a request of the workload with an error."""


def percentile(values: Sequence[float], q: float) -> float:
    """The q-th percentile (0-100), linear interpolation; ``values`` non-empty."""
    return float(np.percentile(np.asarray(values, dtype=np.float64), q))


def make_requests(num: int, max_tokens: int,
                  prompts: Sequence[str] = DEFAULT_PROMPTS) -> list[LoadRequest]:
    """``num`` requests cycling through ``prompts``; each prompt made unique by its index so a
    prefix cache cannot serve one request from another."""
    return [LoadRequest(f"load-{i}", f"[{i}] {prompts[i % len(prompts)]}", max_tokens)
            for i in range(num)]


def request_inputs(req: LoadRequest, temperature: float = 0.0) -> list[grpcclient.InferInput]:
    """The vLLM backend's tensors for one streaming request that generates exactly
    ``max_tokens`` tokens and reports how many each response carries."""
    sampling = json.dumps({"max_tokens": req.max_tokens, "temperature": temperature,
                           "ignore_eos": True})
    values = [("text_input", "BYTES", np.array([req.prompt.encode()], dtype=np.object_)),
              ("stream", "BOOL", np.array([True])),
              ("exclude_input_in_output", "BOOL", np.array([True])),
              ("return_num_output_tokens", "BOOL", np.array([True])),
              ("sampling_parameters", "BYTES", np.array([sampling.encode()], dtype=np.object_))]
    inputs = []
    for name, datatype, array in values:
        tensor = grpcclient.InferInput(name, list(array.shape), datatype)
        tensor.set_data_from_numpy(array)
        inputs.append(tensor)
    return inputs


class _LoadRun:
    """One run: a dispatcher deals requests to per-stream queues under a concurrency limit;
    one task per stream feeds its queue into ``stream_infer`` and reads the responses."""

    def __init__(self, client: aioclient.InferenceServerClient, model: str,
                 requests: Sequence[LoadRequest], streams: int, concurrency: int,
                 temperature: float) -> None:
        self.client, self.model, self.requests = client, model, list(requests)
        self.temperature = temperature
        self.timings = {r.request_id: RequestTiming() for r in self.requests}
        self.queues: list[asyncio.Queue[LoadRequest | None]] = [
            asyncio.Queue() for _ in range(streams)]
        self.slots = asyncio.Semaphore(concurrency)
        self.remaining = len(self.requests)
        # Inputs are built before the clock starts: serialization is client cost, not serving.
        self.inputs = {r.request_id: request_inputs(r, temperature) for r in self.requests}

    async def _feed(self, q: asyncio.Queue[LoadRequest | None]) -> AsyncIterator[dict]:
        while (req := await q.get()) is not None:
            self.timings[req.request_id].sent_at = time.perf_counter()
            yield {"model_name": self.model, "inputs": self.inputs[req.request_id],
                   "request_id": req.request_id}

    async def _stream(self, q: asyncio.Queue[LoadRequest | None]) -> None:
        responses = self.client.stream_infer(self._feed(q))
        async for result, error in responses:
            if error is not None:
                raise LoadError(error.message())
            now = time.perf_counter()
            response = result.get_response()
            timing = self.timings[response.id]
            names = {o.name for o in response.outputs}
            if "text_output" in names:
                text = b"".join(result.as_numpy("text_output").tolist()).decode("utf-8")
                timing.text.append(text)
            if "num_output_tokens" in names:
                new_tokens = int(result.as_numpy("num_output_tokens").sum())
                # Time to first *token*: a token's text may be empty (a special token).
                if new_tokens and timing.first_at is None:
                    timing.first_at = now
                timing.output_tokens += new_tokens
            if response.parameters["triton_final_response"].bool_param:
                timing.done_at = now
                self.slots.release()
                self.remaining -= 1
                if self.remaining == 0:
                    for other in self.queues:
                        other.put_nowait(None)

    async def _dispatch(self) -> None:
        for i, req in enumerate(self.requests):
            await self.slots.acquire()
            self.queues[i % len(self.queues)].put_nowait(req)

    async def run(self) -> float:
        """Runs the workload; returns its wall time."""
        start = time.perf_counter()
        tasks = [asyncio.create_task(self._dispatch())]
        tasks += [asyncio.create_task(self._stream(q)) for q in self.queues]
        try:
            await asyncio.gather(*tasks)
        except BaseException:
            # One failed stream must not leave the others waiting for slots forever.
            for task in tasks:
                task.cancel()
            raise
        return max(t.done_at or start for t in self.timings.values()) - start


async def run_load(url: str, model: str, requests: Sequence[LoadRequest], *, streams: int = 1,
                   concurrency: int | None = None, temperature: float = 0.0) -> LoadReport:
    """Runs ``requests`` against the server at ``url``; raises ``LoadError`` on a stream error."""
    if not requests:
        raise ValueError("no requests")
    streams = max(1, min(streams, len(requests)))
    concurrency = concurrency or len(requests)
    client = aioclient.InferenceServerClient(url)
    try:
        run = _LoadRun(client, model, requests, streams, concurrency, temperature)
        wall = await run.run()
    finally:
        await client.close()
    timings = run.timings
    ttfts = [t.first_at - t.sent_at for t in timings.values() if t.first_at is not None]
    latencies = [t.done_at - t.sent_at for t in timings.values() if t.done_at is not None]
    tokens = sum(t.output_tokens for t in timings.values())
    return LoadReport(
        num_requests=len(requests), streams=streams, concurrency=concurrency, wall_s=wall,
        output_tokens=tokens, tokens_per_s=tokens / wall if wall > 0 else 0.0,
        ttft_p50_s=percentile(ttfts, 50) if ttfts else float("nan"),
        ttft_p95_s=percentile(ttfts, 95) if ttfts else float("nan"),
        latency_p50_s=percentile(latencies, 50), latency_p95_s=percentile(latencies, 95),
        ttfts_s=ttfts, texts={rid: "".join(t.text) for rid, t in timings.items()})


def format_report(report: LoadReport) -> str:
    """Human-readable lines of a report."""
    return "\n".join([
        f"requests {report.num_requests} over {report.streams} streams "
        f"(concurrency {report.concurrency}), wall {report.wall_s:.2f} s",
        f"throughput {report.tokens_per_s:.1f} output tokens/s ({report.output_tokens} tokens)",
        f"TTFT p50 {report.ttft_p50_s * 1e3:.1f} ms, p95 {report.ttft_p95_s * 1e3:.1f} ms "
        f"(mean {statistics.fmean(report.ttfts_s) * 1e3:.1f} ms)" if report.ttfts_s else "TTFT -",
        f"latency p50 {report.latency_p50_s * 1e3:.1f} ms, "
        f"p95 {report.latency_p95_s * 1e3:.1f} ms",
    ])


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--url", default="127.0.0.1:8001", help="gRPC host:port")
    parser.add_argument("--model", default="smollm2")
    parser.add_argument("--requests", type=int, default=64)
    parser.add_argument("--streams", type=int, default=16)
    parser.add_argument("--concurrency", type=int, default=None,
                        help="most requests in flight (default: all)")
    parser.add_argument("--max-tokens", type=int, default=64)
    parser.add_argument("--temperature", type=float, default=0.0)
    parser.add_argument("--json", action="store_true", help="print the summary as JSON")
    args = parser.parse_args(argv)
    requests = make_requests(args.requests, args.max_tokens)
    try:
        report = asyncio.run(run_load(args.url, args.model, requests, streams=args.streams,
                                      concurrency=args.concurrency,
                                      temperature=args.temperature))
    except LoadError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1
    print(json.dumps(report.summary(), indent=2) if args.json else format_report(report))
    return 0


if __name__ == "__main__":
    sys.exit(main())
