"""Serving overhead: the same streaming workload through each door of the server and through
the engine's Python API.

What is measured, in one run, on one workload (64 requests by default, greedy, every request
generating exactly ``max_tokens`` tokens with EOS ignored, all submitted at once):

* **the doors** (``--protocol``, any of ``grpc``, ``kserve-http``, ``openai``; all three by
  default): our server (``python -m pagedserve serve``, the default ``model_repository/``) in a
  subprocess on loopback, driven by ``clients/load.py`` (``tritonclient.grpc.aio``, requests
  dealt over 16 ModelStreamInfer streams) or ``clients/load_http.py`` (aiohttp: Triton's
  ``generate_stream`` and OpenAI's streamed ``/v1/completions``, Server-Sent Events);
* **direct**: the same engine settings (read from the same repository by the server's own
  ``pagedserve.repository`` code) in a worker process (``bench/serve_direct.py``), the requests
  driven through ``AsyncEngine.generate`` concurrently.

Figures, per door: output tokens/s (tokens over the wall time from the first submission to the
last final output), the ratio door/direct (target >= 0.95), time to first token (submission to
the first response carrying a token) p50/p95, and the **TTFT overhead p50** = door p50 - direct
p50 (target < 5 ms) measured on a second workload run one request at a time (64 requests of 1
token, on one stream; 2 x ``--rounds`` rounds rotating the paths, p50 over all rounds'
requests). Under 64 concurrent requests every first token comes out of the
same ~2 s prefill step, whose length varies by hundreds of milliseconds between identical runs,
so the concurrent TTFTs (reported too) cannot resolve a few milliseconds of protocol overhead;
at concurrency 1 the step is a short prefill and the difference is the door's hop itself. The
load generator shares the machine with the server: its CPU time is part of a door's figure, as
it would be for any client on the same host.

The machine is small and shared: a competing process skews everything. Each phase records how
much CPU other processes took (``/proc/stat``, less the processes of the phase) and
the run warns above 10% of the machine. ``--rounds N`` runs every path N times, rotating which
goes first, and reports the median of each.

``--compare-triton`` measures instead our server against **real Triton hosting the same engine**
(the nvidia-pytriton wheel's ``tritonserver`` with the ``pagedserve`` Python-based backend,
``pagedserve.python_backend.host``), both serving ``model_repository/`` at once, on the same
concurrent workload through the same client: output tokens/s and TTFT p50/p95 of each, and the
ratio ours/Triton (target >= 1.0, with a lower TTFT). The Triton figure includes its Python
backend's costs (every response crosses from the stub process to the server by shared memory
and a message queue; docs/benchmarks.md).

Usage (from the repository root)::

    python -m pagedserve.bench.serve [--quick] [--rounds N] [--requests 64] [--max-tokens 64]
                                     [--protocol grpc,kserve-http,openai] [--out FILE]
    python -m pagedserve.bench.serve --compare-triton [--rounds N] [--out FILE]
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import platform
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from dataclasses import asdict, dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from clients.load import LoadReport, LoadRequest, make_requests, run_load
from clients.load_http import run_http_load
from pagedserve.bench.cpu_steal import proc_stat_cpu as _proc_stat_cpu
from pagedserve.bench.serving import terminate
from pagedserve.bench.throughput import git_state
from pagedserve.python_backend.host import Ports, TritonHost, wait_ready

ROOT = Path(__file__).resolve().parent.parent
DEFAULT_OUT = ROOT / "bench" / "results" / "serve.json"
TRITON_OUT = ROOT / "bench" / "results" / "serve_triton.json"
REPOSITORY = ROOT / "model_repository"
MODEL = "smollm2"
TARGET_RATIO = 0.95
TARGET_TTFT_OVERHEAD_S = 0.005
TARGET_RATIO_OVER_TRITON = 1.0
DOORS = ("grpc", "kserve-http", "openai")


@dataclass(frozen=True)
class Workload:
    num_requests: int
    max_tokens: int
    streams: int


FULL = Workload(num_requests=64, max_tokens=64, streams=16)
QUICK = Workload(num_requests=8, max_tokens=8, streams=4)
WARMUP = Workload(num_requests=4, max_tokens=4, streams=2)
# One request at a time, one token each: the first token is the whole request.
SEQUENTIAL = Workload(num_requests=64, max_tokens=1, streams=1)
QUICK_SEQUENTIAL = Workload(num_requests=8, max_tokens=1, streams=1)


# ----------------------------------------------------------------------------------- contention


def _pid_cpu_s(pid: int) -> float:
    """CPU seconds (user + system) a process has used, from ``/proc/<pid>/stat``."""
    try:
        fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    except OSError:
        return 0.0
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


class Contention:
    """CPU taken by processes other than this one and ``pids`` over an interval."""

    def __init__(self, pids: tuple[int, ...]) -> None:
        self.pids = pids
        self._wall = time.perf_counter()
        self._ours = time.process_time() + sum(map(_pid_cpu_s, pids))
        self._stat = _proc_stat_cpu()

    def stop(self) -> dict[str, float | None]:
        wall = time.perf_counter() - self._wall
        ours = time.process_time() + sum(map(_pid_cpu_s, self.pids)) - self._ours
        stat = _proc_stat_cpu()
        if self._stat is None or stat is None:
            return {"wall_s": wall, "ours_cpu_s": ours, "others_fraction_of_machine": None}
        others = max(0.0, stat[0] - self._stat[0] - ours)
        return {"wall_s": wall, "ours_cpu_s": ours, "others_cpu_s": others,
                "steal_s": stat[1] - self._stat[1],
                "others_fraction_of_machine": others / (wall * (os.cpu_count() or 1))}


# ------------------------------------------------------------------------------------- phases


@dataclass
class PhaseResult:
    """One timed run of the workload through one path."""

    path: str
    wall_s: float
    output_tokens: int
    tokens_per_s: float
    ttft_p50_s: float
    ttft_p95_s: float
    latency_p50_s: float
    contention: dict[str, float | None]
    ttfts_s: list[float] = field(default_factory=list)  # per request, in completion order


def _free_port() -> int:
    with socket.socket() as sock:  # a loopback port free right now
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


class Server:
    """``python -m pagedserve serve`` on free loopback ports (HTTP only when ``http``; metrics
    on the HTTP port)."""

    def __init__(self, repository: Path, http: bool = False) -> None:
        self.port = _free_port()
        self.http_port = _free_port() if http else 0
        self.url = f"127.0.0.1:{self.port}"
        self.http_url = f"http://127.0.0.1:{self.http_port}"
        # The server's log, kept for a post-mortem when it fails to start.
        self.log = tempfile.NamedTemporaryFile(prefix="serve-bench-", suffix=".log",  # noqa: SIM115
                                               delete=False)
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "pagedserve", "serve", "--model-repository", str(repository),
             "--host", "127.0.0.1", "--grpc-port", str(self.port), "--http-port",
             str(self.http_port), "--metrics-port", str(self.http_port)], cwd=ROOT,
            stdout=self.log, stderr=subprocess.STDOUT)

    def wait_ready(self, timeout: float = 300.0) -> None:
        try:
            wait_ready(self.url, timeout, self.proc)
        except RuntimeError as e:
            raise RuntimeError(f"{e}; see {self.log.name}") from None

    def stop(self) -> int:
        status = terminate(self.proc)
        self.log.close()
        return status


def _children(pid: int) -> tuple[int, ...]:
    """The processes ``pid`` started (Triton's Python-backend stubs)."""
    found = []
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            if int(stat.read_text().rsplit(")", 1)[1].split()[1]) == pid:
                found.append(int(stat.parent.name))
        except (OSError, ValueError, IndexError):
            continue
    return tuple(found)


def _phase(path: str, report: LoadReport, monitor: Contention) -> PhaseResult:
    return PhaseResult(path, report.wall_s, report.output_tokens, report.tokens_per_s,
                       report.ttft_p50_s, report.ttft_p95_s, report.latency_p50_s,
                       monitor.stop(), report.ttfts_s)


async def grpc_phase(url: str, pids: tuple[int, ...], requests: list[LoadRequest], streams: int,
                     path: str = "grpc") -> PhaseResult:
    monitor = Contention(pids)
    return _phase(path, await run_load(url, MODEL, requests, streams=streams), monitor)


async def door_phase(door: str, server: Server, requests: list[LoadRequest], streams: int,
                     one_at_a_time: bool = False) -> PhaseResult:
    """The workload through one door of ``server`` (one request at a time if asked)."""
    monitor = Contention((server.proc.pid,))
    concurrency = 1 if one_at_a_time else None
    if door == "grpc":
        report = await run_load(server.url, MODEL, requests,
                                streams=1 if one_at_a_time else streams,
                                concurrency=concurrency)
    else:
        report = await run_http_load(server.http_url, door, MODEL, requests,
                                     concurrency=concurrency)
    return _phase(door, report, monitor)


class DirectWorker:
    """``bench/serve_direct.py`` in a subprocess: the engine driven through its Python API, in
    a process of its own like the server's, so the phases differ only by the gRPC hop."""

    def __init__(self, repository: Path) -> None:
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "pagedserve.bench.serve_direct", "--repository", str(repository),
             "--model", MODEL], cwd=ROOT, stdin=subprocess.PIPE, stdout=subprocess.PIPE,
            text=True)

    def _read(self) -> dict[str, Any]:
        assert self.proc.stdout is not None
        line = self.proc.stdout.readline()
        if not line:
            raise RuntimeError(f"direct worker exited ({self.proc.wait()})")
        return json.loads(line)

    def wait_ready(self) -> None:
        assert self._read() == {"ready": True}

    def run(self, requests: list[LoadRequest], tag: str, sequential: bool = False
            ) -> PhaseResult:
        assert self.proc.stdin is not None
        self.proc.stdin.write(json.dumps({"tag": tag, "requests": [asdict(r) for r in requests],
                                          "sequential": sequential}) + "\n")
        self.proc.stdin.flush()
        return PhaseResult(**self._read())

    def stop(self) -> None:
        if self.proc.poll() is None:
            assert self.proc.stdin is not None
            self.proc.stdin.write("\n")
            self.proc.stdin.close()
            try:
                self.proc.wait(60)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()


# --------------------------------------------------------------------------------------- main


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n", 1)[0])
    parser.add_argument("--quick", action="store_true",
                        help=f"a small workload ({QUICK.num_requests} requests of "
                             f"{QUICK.max_tokens} tokens): checks the script works")
    parser.add_argument("--requests", type=int, help="requests in the workload (default 64)")
    parser.add_argument("--max-tokens", type=int, help="tokens per request (default 64)")
    parser.add_argument("--streams", type=int, help="gRPC streams (default 16)")
    parser.add_argument("--rounds", type=int, default=1,
                        help="alternate the two phases this many times; medians are reported")
    parser.add_argument("--protocol", default=",".join(DOORS),
                        help="the doors measured, comma-separated, of " + ", ".join(DOORS) +
                             " (default: all)")
    parser.add_argument("--compare-triton", action="store_true",
                        help="our server against real Triton hosting the same engine")
    parser.add_argument("--out", type=Path,
                        help=f"where to write the JSON result (default: {DEFAULT_OUT}, "
                             f"{TRITON_OUT} with --compare-triton)")
    return parser.parse_args(argv)


def _median(phases: list[PhaseResult], key: str) -> float:
    return float(statistics.median(getattr(p, key) for p in phases))


def _rotated(paths: list[str], i: int) -> list[str]:
    """The paths, the i-th round starting further along: a drift in machine speed hits all."""
    k = i % len(paths)
    return paths[k:] + paths[:k]


async def run(args: argparse.Namespace, workload: Workload, doors: list[str]
              ) -> dict[str, Any]:
    one_at_a_time = QUICK_SEQUENTIAL if args.quick else SEQUENTIAL
    requests = make_requests(workload.num_requests, workload.max_tokens)
    warmup = make_requests(WARMUP.num_requests, WARMUP.max_tokens)
    sequential = make_requests(one_at_a_time.num_requests, one_at_a_time.max_tokens)
    server = Server(REPOSITORY, http=any(d != "grpc" for d in doors))
    direct = DirectWorker(REPOSITORY)
    paths = ["direct", *doors]
    concurrent: dict[str, list[PhaseResult]] = {p: [] for p in paths}
    alone: dict[str, list[PhaseResult]] = {p: [] for p in paths}
    try:
        server.wait_ready()
        direct.wait_ready()
        # Warm every path (first-call allocations, lazy imports) outside the timed sections.
        for door in doors:
            await door_phase(door, server, warmup, WARMUP.streams)
        direct.run(warmup, "warmup")
        for i in range(args.rounds):
            for path in _rotated(paths, i):
                last = (direct.run(requests, f"r{i}") if path == "direct" else
                        await door_phase(path, server, requests, workload.streams))
                concurrent[path].append(last)
                print(f"round {i + 1} {path:12s} {last.tokens_per_s:8.1f} tok/s  TTFT p50 "
                      f"{last.ttft_p50_s * 1e3:7.1f} ms  wall {last.wall_s:6.2f} s", flush=True)
        # One request at a time, rotating the paths round by round like the concurrent phases.
        for i in range(2 * args.rounds):
            for path in _rotated(paths, i):
                last = (direct.run(sequential, f"seq{i}", sequential=True) if path == "direct"
                        else await door_phase(path, server, sequential, 1, one_at_a_time=True))
                alone[path].append(last)
                print(f"round {i + 1} {path:12s} one at a time: TTFT p50 "
                      f"{last.ttft_p50_s * 1e3:7.2f} ms", flush=True)
    finally:
        direct.stop()
        exit_code = server.stop()

    def pooled_p50(path: str) -> float:
        # The TTFT step time varies by tens of ms; pooling every round's requests (rotating
        # paths) makes the p50s precise to a few ms.
        return float(statistics.median(t for p in alone[path] for t in p.ttfts_s))

    direct_tps, direct_alone = _median(concurrent["direct"], "tokens_per_s"), \
        pooled_p50("direct")
    summary = {}
    for door in doors:
        tps = _median(concurrent[door], "tokens_per_s")
        summary[door] = {
            "tokens_per_s": tps, "ratio_over_direct": tps / direct_tps,
            "concurrent_ttft_p50_s": _median(concurrent[door], "ttft_p50_s"),
            "ttft_p50_s": pooled_p50(door),
            "ttft_overhead_p50_s": pooled_p50(door) - direct_alone}
    return {
        "benchmark": "serve",
        "timestamp": datetime.now(UTC).isoformat(),
        "quick": args.quick,
        "workload": asdict(workload),
        "sequential_workload": asdict(one_at_a_time),
        "rounds": args.rounds,
        "doors": summary,
        "direct": {"tokens_per_s": direct_tps,
                   "concurrent_ttft_p50_s": _median(concurrent["direct"], "ttft_p50_s"),
                   "ttft_p50_s": direct_alone},
        "phases": {p: [asdict(r) for r in runs] for p, runs in concurrent.items()},
        "sequential_phases": {p: [asdict(r) for r in runs] for p, runs in alone.items()},
        "targets": {"ratio_min": TARGET_RATIO, "ttft_overhead_p50_max_s": TARGET_TTFT_OVERHEAD_S},
        "server_exit_code": exit_code,
        "machine": {"platform": platform.platform(), "cpu_count": os.cpu_count(),
                    "loadavg_at_end": os.getloadavg()},
        "git": git_state(),
    }


async def compare_triton(args: argparse.Namespace, workload: Workload) -> dict[str, Any]:
    """Our server and real Triton hosting the same engine, both up at once, alternating."""
    requests = make_requests(workload.num_requests, workload.max_tokens)
    warmup = make_requests(WARMUP.num_requests, WARMUP.max_tokens)
    server = Server(REPOSITORY)
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        # The log outlives the run, for a post-mortem.
        triton = TritonHost(REPOSITORY, Ports(grpc=int(sock.getsockname()[1])),
                            log_path=Path(tempfile.mkstemp(prefix="triton-bench-",
                                                           suffix=".log")[1]))
        print(f"tritonserver log: {triton.log_path}", flush=True)
    runs: dict[str, list[PhaseResult]] = {"ours": [], "triton": []}
    try:
        triton.start()
        server.wait_ready()
        assert triton.proc is not None
        pids = {"ours": (server.proc.pid,),
                "triton": (triton.proc.pid, *_children(triton.proc.pid))}
        urls = {"ours": server.url, "triton": triton.grpc_url}
        for path in runs:  # first-call allocations and lazy imports, outside the timing
            await run_load(urls[path], MODEL, warmup, streams=WARMUP.streams)
        for i in range(args.rounds):
            # Alternate which goes first so a drift in machine speed hits both alike.
            for path in ("ours", "triton") if i % 2 == 0 else ("triton", "ours"):
                last = await grpc_phase(urls[path], pids[path], requests, workload.streams,
                                        path)
                runs[path].append(last)
                print(f"round {i + 1} {path:6s} {last.tokens_per_s:8.1f} tok/s  TTFT p50 "
                      f"{last.ttft_p50_s * 1e3:7.1f} ms  p95 {last.ttft_p95_s * 1e3:7.1f} ms  "
                      f"wall {last.wall_s:6.2f} s", flush=True)
    finally:
        exit_code = server.stop()
        triton.stop()
    ours_tps, triton_tps = _median(runs["ours"], "tokens_per_s"), _median(runs["triton"],
                                                                          "tokens_per_s")
    return {
        "benchmark": "serve --compare-triton",
        "timestamp": datetime.now(UTC).isoformat(),
        "workload": asdict(workload),
        "rounds": args.rounds,
        "ours": [asdict(p) for p in runs["ours"]],
        "triton": [asdict(p) for p in runs["triton"]],
        "ours_tokens_per_s": ours_tps,
        "triton_tokens_per_s": triton_tps,
        "ratio_ours_over_triton": ours_tps / triton_tps,
        "ours_ttft_p50_s": _median(runs["ours"], "ttft_p50_s"),
        "triton_ttft_p50_s": _median(runs["triton"], "ttft_p50_s"),
        "ours_ttft_p95_s": _median(runs["ours"], "ttft_p95_s"),
        "triton_ttft_p95_s": _median(runs["triton"], "ttft_p95_s"),
        "targets": {"ratio_min": TARGET_RATIO_OVER_TRITON, "ttft": "ours < triton"},
        "server_exit_code": exit_code,
        "machine": {"platform": platform.platform(), "cpu_count": os.cpu_count(),
                    "loadavg_at_end": os.getloadavg()},
        "git": git_state(),
    }


def report_triton(result: dict[str, Any]) -> None:
    ratio = result["ratio_ours_over_triton"]
    print()
    print("=" * 72)
    for path, name in (("ours", "ours"), ("triton", "Triton")):
        print(f"{name:9s} {result[f'{path}_tokens_per_s']:9.1f} output tok/s   TTFT p50 "
              f"{result[f'{path}_ttft_p50_s'] * 1e3:7.1f} ms  p95 "
              f"{result[f'{path}_ttft_p95_s'] * 1e3:7.1f} ms")
    print(f"ratio     {ratio:9.3f}  ours / Triton (target >= {TARGET_RATIO_OVER_TRITON})  "
          f"{'OK' if ratio >= TARGET_RATIO_OVER_TRITON else 'BELOW TARGET'}")
    lower = result["ours_ttft_p50_s"] < result["triton_ttft_p50_s"]
    print(f"TTFT p50  {'lower' if lower else 'NOT lower'} than Triton's")
    fractions = [p["contention"]["others_fraction_of_machine"]
                 for p in result["ours"] + result["triton"]]
    known = [f for f in fractions if f is not None]
    if known:
        print(f"others    {max(known):9.1%}  most CPU other processes took during a phase")
    if any(f > 0.1 for f in known):
        print("warning: the CPU was shared with other work; figures are skewed", file=sys.stderr)
    print("=" * 72)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    base = QUICK if args.quick else FULL
    workload = Workload(args.requests or base.num_requests, args.max_tokens or base.max_tokens,
                        args.streams or base.streams)
    (ROOT / "bench" / "results").mkdir(parents=True, exist_ok=True)
    print(f"workload: {workload.num_requests} streaming requests x {workload.max_tokens} tokens, "
          f"gRPC over {workload.streams} streams; {args.rounds} round(s)", flush=True)
    if args.compare_triton:
        result = asyncio.run(compare_triton(args, workload))
        report_triton(result)
        out = args.out or TRITON_OUT
        out.write_text(json.dumps(result, indent=2) + "\n")
        print(f"wrote {out}")
        return 0
    doors = [d.strip() for d in args.protocol.split(",") if d.strip()]
    unknown = [d for d in doors if d not in DOORS]
    if unknown or not doors:
        print(f"error: --protocol takes {', '.join(DOORS)}; got {args.protocol!r}",
              file=sys.stderr)
        return 2
    result = asyncio.run(run(args, workload, doors))
    print()
    print("=" * 78)
    direct = result["direct"]
    print(f"{'direct':12s} {direct['tokens_per_s']:9.1f} output tok/s   TTFT p50 "
          f"{direct['concurrent_ttft_p50_s'] * 1e3:7.1f} ms concurrent, "
          f"{direct['ttft_p50_s'] * 1e3:6.2f} ms one at a time")
    for door, figures in result["doors"].items():
        ratio, overhead = figures["ratio_over_direct"], figures["ttft_overhead_p50_s"]
        print(f"{door:12s} {figures['tokens_per_s']:9.1f} output tok/s   TTFT p50 "
              f"{figures['concurrent_ttft_p50_s'] * 1e3:7.1f} ms concurrent, "
              f"{figures['ttft_p50_s'] * 1e3:6.2f} ms one at a time")
        print(f"{'':12s} ratio {ratio:6.3f} over direct (target >= {TARGET_RATIO}) "
              f"{'OK' if ratio >= TARGET_RATIO else 'BELOW TARGET'}; TTFT overhead p50 "
              f"{overhead * 1e3:6.2f} ms (target < {TARGET_TTFT_OVERHEAD_S * 1e3:.0f} ms) "
              f"{'OK' if overhead < TARGET_TTFT_OVERHEAD_S else 'ABOVE TARGET'}")
    fractions = [p["contention"]["others_fraction_of_machine"]
                 for runs in result["phases"].values() for p in runs]
    known = [f for f in fractions if f is not None]
    if known:
        print(f"others       {max(known):9.1%}  most CPU other processes took during a phase")
    if any(f > 0.1 for f in known):
        print("warning: the CPU was shared with other work; figures are skewed", file=sys.stderr)
    print("=" * 78)

    out = args.out or DEFAULT_OUT
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(result, indent=2) + "\n")
    print(f"wrote {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
