"""Async load generator over the HTTP doors: Triton's ``generate_stream`` and the OpenAI API.

The HTTP counterpart of ``clients/load.py`` (same requests, same report): every request streams
(Server-Sent Events) exactly ``max_tokens`` greedy tokens (``ignore_eos``), at most
``concurrency`` in flight. Tokens are counted from what the server says it sent
(``num_output_tokens`` of each generate event; the OpenAI chunks' running
``usage.completion_tokens``), so the figures do not depend on how text splits into tokens.

``run_http_load`` is the reusable entry point (``bench/serve.py --protocol`` drives it).
"""

from __future__ import annotations

import asyncio
import json
import time
from collections.abc import Sequence
from typing import Any

import aiohttp

from clients.load import LoadError, LoadReport, LoadRequest, RequestTiming, percentile

PROTOCOLS = ("kserve-http", "openai")


def _request(protocol: str, model: str, req: LoadRequest) -> tuple[str, bytes]:
    """(path, body) of one streaming request."""
    if protocol == "kserve-http":
        body = {"text_input": req.prompt, "stream": True, "exclude_input_in_output": True,
                "return_num_output_tokens": True,
                "parameters": {"max_tokens": req.max_tokens, "temperature": 0,
                               "ignore_eos": True}}
        return f"/v2/models/{model}/generate_stream", json.dumps(body).encode()
    body = {"model": model, "prompt": req.prompt, "max_tokens": req.max_tokens,
            "temperature": 0, "ignore_eos": True, "stream": True,
            "stream_options": {"include_usage": True, "continuous_usage_stats": True}}
    return "/v1/completions", json.dumps(body).encode()


def _tokens_and_text(protocol: str, event: dict[str, Any]) -> tuple[int | None, str]:
    """(tokens the server has sent so far or in this event, this event's text)."""
    if "error" in event:
        raise LoadError(str(event["error"]))
    if protocol == "kserve-http":
        return int(event.get("num_output_tokens", 0)), str(event.get("text_output", ""))
    usage = event.get("usage") or {}
    text = "".join(c.get("text", "") for c in event.get("choices", []))
    return usage.get("completion_tokens"), text


async def _one(session: aiohttp.ClientSession, base_url: str, protocol: str, model: str,
               req: LoadRequest, timing: RequestTiming, body: bytes, path: str) -> None:
    timing.sent_at = time.perf_counter()
    async with session.post(base_url + path, data=body,
                            headers={"Content-Type": "application/json"}) as response:
        if response.status != 200:
            raise LoadError(f"{response.status}: {(await response.text())[:300]}")
        buffer = b""
        async for chunk in response.content.iter_any():
            buffer += chunk
            *events, buffer = buffer.split(b"\n\n")
            now = time.perf_counter()
            for raw in events:
                if not raw.startswith(b"data: ") or raw == b"data: [DONE]":
                    continue
                tokens, text = _tokens_and_text(protocol, json.loads(raw[6:]))
                timing.text.append(text)
                if protocol == "kserve-http":
                    timing.output_tokens += tokens or 0
                elif tokens is not None:
                    timing.output_tokens = tokens  # a running count
                if timing.output_tokens and timing.first_at is None:
                    timing.first_at = now
    timing.done_at = time.perf_counter()


async def run_http_load(base_url: str, protocol: str, model: str,
                        requests: Sequence[LoadRequest], *, concurrency: int | None = None
                        ) -> LoadReport:
    """Runs ``requests`` against ``base_url`` (``http://host:port``) through ``protocol``."""
    if protocol not in PROTOCOLS:
        raise ValueError(f"protocol must be one of {PROTOCOLS}, got {protocol!r}")
    if not requests:
        raise ValueError("no requests")
    concurrency = concurrency or len(requests)
    timings = {r.request_id: RequestTiming() for r in requests}
    # Bodies are built before the clock starts: serialization is client cost, not serving.
    bodies = {r.request_id: _request(protocol, model, r) for r in requests}
    slots = asyncio.Semaphore(concurrency)
    connector = aiohttp.TCPConnector(limit=concurrency)
    timeout = aiohttp.ClientTimeout(total=None, sock_read=600)
    async with aiohttp.ClientSession(connector=connector, timeout=timeout) as session:

        async def run(req: LoadRequest) -> None:
            async with slots:
                path, body = bodies[req.request_id]
                await _one(session, base_url, protocol, model, req, timings[req.request_id],
                           body, path)

        start = time.perf_counter()
        await asyncio.gather(*(run(r) for r in requests))
    wall = max(t.done_at or start for t in timings.values()) - start
    ttfts = [t.first_at - t.sent_at for t in timings.values() if t.first_at is not None]
    latencies = [t.done_at - t.sent_at for t in timings.values() if t.done_at is not None]
    tokens = sum(t.output_tokens for t in timings.values())
    return LoadReport(
        num_requests=len(requests), streams=concurrency, concurrency=concurrency, wall_s=wall,
        output_tokens=tokens, tokens_per_s=tokens / wall if wall > 0 else 0.0,
        ttft_p50_s=percentile(ttfts, 50) if ttfts else float("nan"),
        ttft_p95_s=percentile(ttfts, 95) if ttfts else float("nan"),
        latency_p50_s=percentile(latencies, 50), latency_p95_s=percentile(latencies, 95),
        ttfts_s=ttfts, texts={rid: "".join(t.text) for rid, t in timings.items()})
