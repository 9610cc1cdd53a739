"""Soak: hours of serving compressed into minutes of hostile, cancelled, concurrent streams.

The server (``python -m pagedserve serve``, the default ``model_repository/``) runs in a subprocess
on free loopback ports. For ``--duration`` seconds ``--streams`` concurrent ``ModelStreamInfer``
calls (one asyncio process, ``grpc.aio``) each keep one request in flight:

* **good** requests: a prompt from a small list, greedy or sampled, ``max_tokens`` drawn from
  8..64 (``--max-tokens``), streamed token by token;
* of those, ``--cancel-fraction`` are **cancelled** by the client mid-generation (after a random
  number of tokens, some before the first): the call is cancelled, as a client that goes away
  does, and the stream is reopened;
* ``--poison-fraction`` of all requests are **poison**: every hostile class the tests know
  (logprobs 10**6, top_k 2**64, out-of-vocabulary stop tokens, nested JSON, 5000-digit numbers,
  empty values, a 100 KB request id, a 4 MiB prompt, ids longer than the context, many stop
  strings, unknown and traversal model names, malformed tensors). Each must be answered by an
  ``error_message`` naming the problem, on a stream that stays open.

Invariants (any violated: exit status 1):

* **lost finals** = 0: every good request not cancelled gets its final response, with finish
  reason ``length`` or ``stop``, at most ``max_tokens`` tokens and no error;
* every poison request gets its error (the expected words, never "internal error");
* **KV blocks in use** (``pagedserve_kv_blocks_used`` on ``/metrics``) = 0 once the load stops
  and the engine is idle: cancelled and failed requests returned their blocks;
* **RSS** (``VmRSS`` of the server) at the end within 10% of the middle of the run;
* the server's log holds no "engine step failed", and SIGTERM ends it with status 0.

Also reported: requests sent / completed / cancelled, poison answered, TTFT p50/p99 of the good
requests that completed (send to the first response carrying a token; under this load it is
mostly queueing for a batch slot), output tokens/s, greedy texts that disagree between requests
with the same prompt (a sign of KV corruption; batch composition can flip near-ties, so it is
reported, not enforced), and the CPU other processes took (the machine may be shared).

Usage (from the repository root)::

    python -m pagedserve.bench.soak [--duration 600] [--streams 256] [--cancel-fraction 0.2]
        [--poison-fraction 0.05] [--seed 0] [--max-tokens 64] [--stall-timeout 900]
        [--out bench/results/soak.json]

Figures and the list of hostile cases: docs/reliability.md.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import platform
import random
import signal
import socket
import struct
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.request
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import grpc
import numpy as np
import tritonclient.grpc.service_pb2 as pb
import tritonclient.grpc.service_pb2_grpc as pb_grpc

from clients.load import DEFAULT_PROMPTS

ROOT = Path(__file__).resolve().parent.parent
REPOSITORY = ROOT / "model_repository"
DEFAULT_OUT = ROOT / "bench" / "results" / "soak.json"
MODEL = "smollm2"
PROMPTS = (*DEFAULT_PROMPTS, "Hello, my name is", "The capital of France is",
           "def fibonacci(n):", "Once upon a time,")
MIN_TOKENS, MAX_TOKENS = 8, 64
# A response that does not come within this long counts as lost. Under full load a request may
# queue behind a whole batch of 64-token generations: on a shared 2-core machine 128 sequences
# decode at ~40 tokens/s together, so a wait of minutes is slow service, not a lost request.
STALL_TIMEOUT_S = 900.0
RSS_INTERVAL_S = 5.0
PROGRESS_INTERVAL_S = 30.0
IDLE_TIMEOUT_S = 60.0
RSS_TOLERANCE = 0.10
# Below this the middle of the run is still the warm-up (the batch fills, the allocator grows to
# its working set), so the RSS check is reported but not enforced.
RSS_MIN_DURATION_S = 120.0
LOG_FORBIDDEN = ("engine step failed",)


# ------------------------------------------------------------------------------------ server
# (pagedserve.bench.serve and pagedserve.bench.throughput have the same helpers, but importing them
# loads torch and the engine into this process: the client stays small so it does not compete with
# the server.)


def git_state() -> dict[str, Any]:
    """The commit soaked and whether tracked files had uncommitted changes."""
    def git(*cmd: str) -> str:
        return subprocess.run(["git", *cmd], cwd=ROOT, capture_output=True, text=True,
                              check=True).stdout.strip()

    try:
        return {"commit": git("rev-parse", "HEAD"),
                "dirty": bool(git("status", "--porcelain", "--untracked-files=no"))}
    except (OSError, subprocess.CalledProcessError):
        return {"commit": None, "dirty": None}


def _cpu_s(stat_path: str) -> float:
    """User + system CPU seconds of a process (``/proc/<pid>/stat``), 0 once it is gone."""
    try:
        fields = Path(stat_path).read_text().rsplit(")", 1)[1].split()
    except OSError:
        return 0.0
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def _machine_busy_s() -> float:
    """Busy CPU seconds of the whole machine since boot (``/proc/stat``)."""
    ticks = [int(f) for f in Path("/proc/stat").read_text().split("\n", 1)[0].split()[1:]]
    return (ticks[0] + ticks[1] + ticks[2] + ticks[5] + ticks[6]) / os.sysconf("SC_CLK_TCK")


class CpuShare:
    """CPU seconds the server, this client and every other process took over an interval."""

    def __init__(self, server_pid: int) -> None:
        self.server_stat = f"/proc/{server_pid}/stat"
        self.start = self._now()

    def _now(self) -> tuple[float, float, float, float]:
        return (time.monotonic(), _cpu_s(self.server_stat), time.process_time(),
                _machine_busy_s())

    def stop(self) -> dict[str, float]:
        wall, server, client, busy = (b - a for a, b in zip(self.start, self._now()))
        others = max(0.0, busy - server - client)
        return {"wall_s": wall, "server_cpu_s": server, "client_cpu_s": client,
                "others_cpu_s": others,
                "others_fraction_of_machine": others / (wall * (os.cpu_count() or 1))}


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


@dataclass
class ServerProcess:
    """``python -m pagedserve serve`` on free loopback ports, its log in a file kept afterwards."""

    process: subprocess.Popen[bytes]
    grpc_port: int
    http_port: int
    log_path: Path

    @classmethod
    def start(cls, repository: Path, timeout: float = 300.0) -> ServerProcess:
        grpc_port, http_port = _free_port(), _free_port()
        log_path = Path(tempfile.mkstemp(prefix="pagedserve-soak-", suffix=".log")[1])
        command = [sys.executable, "-m", "pagedserve", "serve", "--model-repository",
                   str(repository), "--host", "127.0.0.1", "--grpc-port", str(grpc_port),
                   "--http-port", str(http_port), "--metrics-port", str(http_port)]
        with open(log_path, "wb") as log_file:
            process = subprocess.Popen(command, cwd=ROOT, stdout=log_file,
                                       stderr=subprocess.STDOUT,
                                       env={**os.environ, "PYTHONUNBUFFERED": "1"})
        server = cls(process, grpc_port, http_port, log_path)
        server._wait_ready(timeout)
        return server

    @property
    def grpc_url(self) -> str:
        return f"127.0.0.1:{self.grpc_port}"

    def _get(self, path: str) -> tuple[int, str]:
        try:
            with urllib.request.urlopen(f"http://127.0.0.1:{self.http_port}{path}",
                                        timeout=10) as reply:
                return reply.status, reply.read().decode()
        except urllib.error.HTTPError as e:
            return e.code, e.read().decode()

    def _wait_ready(self, timeout: float) -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.process.poll() is not None:
                raise RuntimeError(f"server exited ({self.process.returncode}); see "
                                   f"{self.log_path}")
            try:
                if self._get("/v2/health/ready")[0] == 200:
                    return
            except OSError:  # not listening yet
                pass
            time.sleep(0.2)
        self.stop()
        raise RuntimeError(f"server not ready after {timeout:.0f} s; see {self.log_path}")

    def metrics(self) -> dict[str, float]:
        """``/metrics`` samples by metric name, summed over models and versions."""
        samples: dict[str, float] = {}
        for line in self._get("/metrics")[1].splitlines():
            if not line or line.startswith("#"):
                continue
            key, _, value = line.rpartition(" ")
            name = key.split("{", 1)[0]
            try:
                samples[name] = samples.get(name, 0.0) + float(value)
            except ValueError:  # not a sample line: nothing the soak reads
                continue
        return samples

    def rss_kb(self) -> int:
        with open(f"/proc/{self.process.pid}/status") as status:
            for line in status:
                if line.startswith("VmRSS:"):
                    return int(line.split()[1])
        raise RuntimeError("no VmRSS")

    def log(self) -> str:
        return self.log_path.read_text(errors="replace")

    def stop(self, timeout: float = 120.0) -> int:
        if self.process.poll() is None:
            self.process.send_signal(signal.SIGTERM)
            try:
                self.process.wait(timeout)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait()
        return int(self.process.returncode)


# ------------------------------------------------------------------------------ requests


Tensor = tuple[str, str, list[int], bytes]  # name, datatype, shape, raw contents


def _bytes(*values: bytes) -> bytes:
    """Raw BYTES contents: each element a 4-byte little-endian length, then the bytes."""
    return b"".join(struct.pack("<I", len(v)) + v for v in values)


def _text(name: str, value: str | bytes) -> Tensor:
    return (name, "BYTES", [1], _bytes(value if isinstance(value, bytes) else value.encode()))


def _flag(name: str, value: bool = True) -> Tensor:
    return (name, "BOOL", [1], bytes([value]))


def _ids(values: list[int]) -> Tensor:
    return ("input_ids", "INT64", [len(values)], np.asarray(values, dtype=np.int64).tobytes())


def build_request(request_id: str, tensors: list[Tensor], model: str = MODEL
                  ) -> pb.ModelInferRequest:
    """A ``ModelInferRequest`` with raw contents, as ``tritonclient`` sends them."""
    request = pb.ModelInferRequest(model_name=model, id=request_id)
    for name, datatype, shape, raw in tensors:
        request.inputs.add(name=name, datatype=datatype, shape=shape)
        request.raw_input_contents.append(raw)
    return request


def _stream_flags() -> list[Tensor]:
    return [_flag("stream"), _flag("exclude_input_in_output"),
            _flag("return_num_output_tokens"), _flag("return_finish_reason")]


def good_request(request_id: str, prompt: str, sampling: dict[str, Any]
                 ) -> pb.ModelInferRequest:
    return build_request(request_id, [_text("text_input", prompt), *_stream_flags(),
                                      _text("sampling_parameters", json.dumps(sampling))])


def _sampled(prompt: str | bytes, sampling: str | dict[str, Any]) -> list[Tensor]:
    text = sampling if isinstance(sampling, str) else json.dumps(sampling)
    return [_text("text_input", prompt), *_stream_flags(), _text("sampling_parameters", text)]


@dataclass(frozen=True)
class Poison:
    """One hostile request and words its error message must contain."""

    name: str
    request: pb.ModelInferRequest
    expect: str


def _poison(name: str, expect: str, tensors: list[Tensor], model: str = MODEL,
            request_id: str | None = None) -> Poison:
    return Poison(name, build_request(request_id or f"poison-{name}", tensors, model), expect)


def _no_value_parameter() -> Poison:
    poison = _poison("parameter without a value", "has no value", _sampled("Hi", {}))
    poison.request.parameters["max_tokens"].SetInParent()  # sent, but holding no value
    return poison


def poisons() -> list[Poison]:
    """Every hostile class of tests/server/test_hostile_requests.py and test_bad_inputs.py."""
    greedy = {"temperature": 0, "max_tokens": 8}
    wrong_count = build_request("poison-raw-count", _sampled("Hi", greedy))
    wrong_count.raw_input_contents.append(b"extra")  # one more raw buffer than inputs
    return [
        _poison("logprobs above the vocabulary", "logprobs",
                _sampled("Hi", {**greedy, "logprobs": 10**6})),
        _poison("logprobs above max_logprobs", "logprobs",
                _sampled("Hi", {**greedy, "logprobs": 21})),
        _poison("top_k beyond 64 bits", "top_k", _sampled("Hi", {**greedy, "top_k": 2**64})),
        _poison("stop token outside the vocabulary", "stop_token_ids",
                _sampled("Hi", {**greedy, "stop_token_ids": [10**6], "min_tokens": 2})),
        _poison("nested JSON", "nested too deeply", _sampled("Hi", "[" * 100_000)),
        _poison("5000-digit number", "max_tokens",
                _sampled("Hi", '{"max_tokens": 1' + "0" * 5000 + "}")),
        _poison("5000-digit float", "temperature",
                _sampled("Hi", '{"temperature": 1' + "0" * 5000 + "}")),
        _poison("empty value", "max_tokens", _sampled("Hi", '{"max_tokens": ""}')),
        _no_value_parameter(),
        _poison("empty prompt", "must not be empty", _sampled("", greedy)),
        _poison("100 KB request id", "request id is", _sampled("Hi", greedy),
                request_id="i" * 100_000),
        # Refused by its bytes before decoding (server), then by its characters before
        # tokenizing (engine): the default model's limit lies between the two sizes.
        _poison("4 MiB prompt", "fits the maximum context",
                _sampled("word " * (4 * 2**20 // 5), greedy)),
        _poison("1.5 MB prompt", "fits the maximum context",
                _sampled("word " * 300_000, greedy)),
        _poison("input_ids longer than the context", "maximum context length",
                [_ids(list(range(5000))), *_stream_flags(),
                 _text("sampling_parameters", json.dumps(greedy))]),
        _poison("token id outside the vocabulary", "outside the vocabulary",
                [_ids([1, 2, 10**9]), *_stream_flags(),
                 _text("sampling_parameters", json.dumps(greedy))]),
        _poison("many stop strings", "stop", _sampled("Hi", {**greedy, "stop": ["a"] * 1000})),
        _poison("unknown model", "Request for unknown model", _sampled("Hi", greedy),
                model="nope"),
        _poison("traversal model name", "Request for unknown model", _sampled("Hi", greedy),
                model="../smollm2"),
        _poison("absolute model path", "Request for unknown model", _sampled("Hi", greedy),
                model="/proc/self"),
        _poison("wrong datatype", "data-type is 'INT32'",
                [("stream", "INT32", [1], b"\x01\x00\x00\x00"),
                 _text("text_input", "Hi"), _text("sampling_parameters", json.dumps(greedy))]),
        _poison("wrong shape", "unexpected shape for input 'text_input'",
                [("text_input", "BYTES", [2], _bytes(b"a", b"b")), *_stream_flags()]),
        _poison("unknown input", "unexpected inference input 'foo'",
                [*_sampled("Hi", greedy), _flag("foo")]),
        _poison("BYTES length past the buffer", "exceeds the end of the buffer",
                [("text_input", "BYTES", [1], struct.pack("<I", 2**31) + b"Hi"),
                 *_stream_flags()]),
        _poison("byte size mismatch", "input byte size mismatch",
                [_flag("stream"), ("input_ids", "INT64", [3], b"\x00" * 7)]),
        Poison("raw contents count", wrong_count, "raw input contents"),
        _poison("invalid UTF-8", "not valid UTF-8", _sampled(b"\xff\xfe caf\xc3", greedy)),
        _poison("malformed JSON", "not valid JSON", _sampled("Hi", "{max_tokens: 3")),
        _poison("negative seed", "seed", _sampled("Hi", {**greedy, "seed": -1})),
        _poison("NaN temperature", "temperature must be finite",
                _sampled("Hi", '{"temperature": NaN}')),
        _poison("n of a billion", "max_num_seqs", _sampled("Hi", {"temperature": 1.0, "n": 10**9})),
    ]


# --------------------------------------------------------------------------- responses


@dataclass
class Response:
    """What the soak reads from one streamed response."""

    request_id: str
    error: str
    final: bool
    tokens: int
    text: str
    finish_reason: str


def _decode_bytes(raw: bytes) -> list[bytes]:
    values, offset = [], 0
    while offset + 4 <= len(raw):
        (length,) = struct.unpack_from("<I", raw, offset)
        values.append(raw[offset + 4:offset + 4 + length])
        offset += 4 + length
    return values


def parse_response(message: pb.ModelStreamInferResponse) -> Response:
    response = message.infer_response
    outputs = {o.name: raw for o, raw in zip(response.outputs, response.raw_output_contents)}
    tokens = outputs.get("num_output_tokens", b"")
    reason = _decode_bytes(outputs.get("finish_reason", b""))
    return Response(
        request_id=response.id, error=message.error_message,
        final=response.parameters["triton_final_response"].bool_param,
        tokens=int(np.frombuffer(tokens, dtype=np.uint32).sum()) if tokens else 0,
        text=b"".join(_decode_bytes(outputs.get("text_output", b""))).decode("utf-8",
                                                                            "replace"),
        finish_reason=reason[0].decode() if reason else "")


# ------------------------------------------------------------------------------- tallies


@dataclass
class Tally:
    """Counts over the whole run; ``*_examples`` keep the first few cases for the report."""

    sent: int = 0
    good_sent: int = 0
    completed: int = 0
    cancelled: int = 0
    cancel_planned_but_finished: int = 0
    poison_sent: int = 0
    poison_answered: int = 0
    poison_unrefused: int = 0  # a poison request that ran to a final response: must be 0
    poison_bad_answer: int = 0  # an error without the expected words, or a dead stream
    lost_finals: int = 0
    bad_completions: int = 0  # a final with a wrong finish reason or too many tokens
    greedy_disagreements: int = 0
    output_tokens: int = 0
    streams_opened: int = 0
    ttfts_s: list[float] = field(default_factory=list)
    poison_by_class: dict[str, int] = field(default_factory=dict)
    poison_messages: dict[str, str] = field(default_factory=dict)  # the first answer of each
    examples: dict[str, list[str]] = field(default_factory=dict)

    def note(self, kind: str, text: str, keep: int = 5) -> None:
        cases = self.examples.setdefault(kind, [])
        if len(cases) < keep:
            cases.append(text[:300])


class GreedyTexts:
    """Greedy texts by prompt: two requests with the same prompt must agree on their common
    length (the longer one's text starts with the shorter one's)."""

    def __init__(self) -> None:
        self.longest: dict[str, str] = {}

    def agrees(self, prompt: str, text: str) -> bool:
        known = self.longest.get(prompt, "")
        if not (known.startswith(text) or text.startswith(known)):
            return False
        if len(text) > len(known):
            self.longest[prompt] = text
        return True


# ---------------------------------------------------------------------------------- load


@dataclass
class Finished:
    """A good request followed to its final response."""

    tokens: int = 0
    texts: list[str] = field(default_factory=list)
    ttft_s: float | None = None  # send to the first response carrying a token
    finish_reason: str = ""


class StreamLost(Exception):
    """The request's stream failed or stalled before its final response."""


@dataclass(frozen=True)
class SoakSettings:
    duration_s: float
    streams: int
    cancel_fraction: float
    poison_fraction: float
    seed: int
    max_tokens: int = MAX_TOKENS  # drawn uniformly from MIN_TOKENS (or less) to this
    stall_timeout_s: float = STALL_TIMEOUT_S


class Soak:
    """The client side: ``streams`` workers, each a ``ModelStreamInfer`` call with one request
    in flight, until the deadline; then each finishes the request it has in flight."""

    def __init__(self, server: ServerProcess, settings: SoakSettings) -> None:
        self.server = server
        self.settings = settings
        self.tally = Tally()
        self.greedy = GreedyTexts()
        self.poisons = poisons()
        self.deadline = 0.0
        self._ids = 0

    def _next_id(self, prefix: str) -> str:
        self._ids += 1
        return f"{prefix}-{self._ids}"

    async def run(self) -> None:
        self.deadline = time.monotonic() + self.settings.duration_s
        # Default receive cap (4 MB) is plenty for responses; sends are unlimited client-side.
        async with grpc.aio.insecure_channel(self.server.grpc_url) as channel:
            stub = pb_grpc.GRPCInferenceServiceStub(channel)
            workers = [self._worker(stub, slot) for slot in range(self.settings.streams)]
            await asyncio.gather(*workers)

    def _open(self, stub: pb_grpc.GRPCInferenceServiceStub) -> Any:
        self.tally.streams_opened += 1
        return stub.ModelStreamInfer()

    async def _worker(self, stub: pb_grpc.GRPCInferenceServiceStub, slot: int) -> None:
        # One RNG per stream: its sequence of choices does not depend on response timing.
        rng = random.Random(self.settings.seed * 1_000_003 + slot)
        call = self._open(stub)
        # The first stream starts with every poison class once, so each run covers them all
        # (under load: the other streams are already generating) whatever the fraction.
        sweep = list(self.poisons) if slot == 0 else []
        while sweep or time.monotonic() < self.deadline:
            if sweep:
                alive = await self._poison(call, sweep.pop(0))
            elif rng.random() < self.settings.poison_fraction:
                alive = await self._poison(call, rng.choice(self.poisons))
            else:
                cancel = rng.random() < self.settings.cancel_fraction
                alive = await self._good(call, rng, cancel)
            if not alive:
                call.cancel()
                call = self._open(stub)
        await self._close(call)

    async def _read(self, call: Any) -> Response:
        try:
            message = await asyncio.wait_for(call.read(), self.settings.stall_timeout_s)
        except TimeoutError:
            raise StreamLost(f"no response in {self.settings.stall_timeout_s:g} s") from None
        except grpc.aio.AioRpcError as e:
            raise StreamLost(f"stream failed: {e.code()} {e.details()}") from None
        if message is grpc.aio.EOF:
            raise StreamLost("stream ended")
        return parse_response(message)

    async def _send(self, call: Any, request: pb.ModelInferRequest) -> None:
        try:
            await call.write(request)
        except (grpc.aio.AioRpcError, grpc.aio.UsageError) as e:
            raise StreamLost(f"write failed: {e}") from None

    async def _good(self, call: Any, rng: random.Random, cancel: bool) -> bool:
        """Sends one good request and follows it to its final response, or cancels the call
        after ``cancel_after`` tokens. Returns whether the call is still usable."""
        prompt = rng.choice(PROMPTS)
        max_tokens = rng.randint(min(MIN_TOKENS, self.settings.max_tokens),
                                 self.settings.max_tokens)
        greedy = rng.random() < 0.5
        sampling: dict[str, Any] = {"max_tokens": max_tokens, "temperature": 0.0}
        if not greedy:
            sampling.update(temperature=0.8, top_p=0.95, top_k=50, seed=rng.randrange(2**31))
        cancel_after = rng.randint(0, max_tokens - 1) if cancel else -1
        request_id = self._next_id("good")
        self.tally.sent += 1
        self.tally.good_sent += 1
        try:
            await self._send(call, good_request(request_id, prompt, sampling))
            if cancel_after == 0:  # cancelled while queued or prefilling
                await asyncio.sleep(rng.uniform(0.0, 0.5))
                self.tally.cancelled += 1
                return False
            done = await self._follow(call, request_id, cancel_after)
        except StreamLost as e:
            self._lost(request_id, str(e))
            return False
        if done is None:
            self.tally.cancelled += 1
            return False
        self._finished(request_id, prompt, greedy, max_tokens, done)
        if cancel:
            self.tally.cancel_planned_but_finished += 1
        return True

    async def _follow(self, call: Any, request_id: str, cancel_after: int) -> Finished | None:
        """Reads the request's responses to its final one; ``None`` once ``cancel_after``
        tokens came first (-1: never). Raises ``StreamLost`` on an error or a lost stream."""
        sent_at = time.perf_counter()
        done = Finished()
        while True:
            response = await self._read(call)
            if response.error or response.request_id != request_id:
                raise StreamLost(f"{response.request_id!r}: {response.error}")
            if response.tokens and done.ttft_s is None:
                done.ttft_s = time.perf_counter() - sent_at
            done.tokens += response.tokens
            done.texts.append(response.text)
            if response.final:
                done.finish_reason = response.finish_reason
                return done
            if 0 < cancel_after <= done.tokens:
                return None

    def _lost(self, request_id: str, reason: str) -> None:
        self.tally.lost_finals += 1
        self.tally.note("lost_finals", f"{request_id}: {reason}")

    def _finished(self, request_id: str, prompt: str, greedy: bool, max_tokens: int,
                  done: Finished) -> None:
        tally = self.tally
        tally.completed += 1
        tally.output_tokens += done.tokens
        if done.ttft_s is not None:
            tally.ttfts_s.append(done.ttft_s)
        if done.finish_reason not in ("length", "stop") or not 0 < done.tokens <= max_tokens:
            tally.bad_completions += 1
            tally.note("bad_completions", f"{request_id}: finish {done.finish_reason!r}, "
                                          f"{done.tokens} tokens of {max_tokens}")
        text = "".join(done.texts)
        if greedy and not self.greedy.agrees(prompt, text):
            tally.greedy_disagreements += 1
            tally.note("greedy_disagreements", f"{prompt!r}: {text!r} vs "
                                               f"{self.greedy.longest[prompt]!r}")

    async def _poison(self, call: Any, poison: Poison) -> bool:
        """Sends a poison request; it must come back as an error on a stream that lives on.
        Returns whether the call is still usable."""
        tally = self.tally
        tally.sent += 1
        tally.poison_sent += 1
        tally.poison_by_class[poison.name] = tally.poison_by_class.get(poison.name, 0) + 1
        try:
            await self._send(call, poison.request)
            response = await self._read(call)
            while not response.error and not response.final:
                response = await self._read(call)
        except StreamLost as e:
            tally.poison_bad_answer += 1
            tally.note("poison_bad_answer", f"{poison.name}: {e}")
            return False
        if not response.error:  # it ran to a final response
            tally.poison_unrefused += 1
            tally.note("poison_unrefused", poison.name)
            return True
        tally.poison_answered += 1
        tally.poison_messages.setdefault(poison.name, response.error[:300])
        if poison.expect not in response.error or response.error.startswith("internal error"):
            tally.poison_bad_answer += 1
            tally.note("poison_bad_answer", f"{poison.name}: {response.error}")
        return True

    async def _close(self, call: Any) -> None:
        """Ends a stream the way a polite client does: no more writes, read it to its end."""
        try:
            await call.done_writing()
            await asyncio.wait_for(call.read(), 30)
        except (grpc.aio.AioRpcError, TimeoutError):
            pass
        call.cancel()


# ------------------------------------------------------------------------------- monitor


@dataclass
class RssSample:
    t_s: float
    rss_kb: int


class Monitor:
    """Samples the server's RSS every few seconds and prints progress now and then."""

    def __init__(self, server: ServerProcess, soak: Soak) -> None:
        self.server = server
        self.soak = soak
        self.samples: list[RssSample] = []
        self.started = time.monotonic()

    def sample(self) -> RssSample:
        item = RssSample(time.monotonic() - self.started, self.server.rss_kb())
        self.samples.append(item)
        return item

    async def run(self) -> None:
        last_progress = 0.0
        while True:
            await asyncio.sleep(RSS_INTERVAL_S)
            item = self.sample()
            if item.t_s - last_progress >= PROGRESS_INTERVAL_S:
                last_progress = item.t_s
                metrics = await asyncio.to_thread(self.server.metrics)
                self._progress(item, metrics)

    def _progress(self, item: RssSample, metrics: dict[str, float]) -> None:
        t = self.soak.tally
        print(f"[{item.t_s:6.0f} s] sent {t.sent} completed {t.completed} cancelled "
              f"{t.cancelled} poison {t.poison_answered}/{t.poison_sent} lost {t.lost_finals} | "
              f"running {metrics.get('pagedserve_requests_running', 0):.0f} waiting "
              f"{metrics.get('pagedserve_requests_waiting', 0):.0f} blocks "
              f"{metrics.get('pagedserve_kv_blocks_used', 0):.0f} | RSS "
              f"{item.rss_kb / 1024:.0f} MiB", flush=True)

    def at(self, t_s: float) -> int:
        """The RSS sampled closest to ``t_s`` seconds after the start."""
        return min(self.samples, key=lambda s: abs(s.t_s - t_s)).rss_kb


def wait_idle(server: ServerProcess, timeout: float = IDLE_TIMEOUT_S) -> dict[str, float]:
    """Metrics once nothing runs or waits and no block is used, or at the timeout (a leak)."""
    deadline = time.monotonic() + timeout
    while True:
        metrics = server.metrics()
        busy = sum(metrics.get(f"pagedserve_{k}", 0) for k in (
            "requests_running", "requests_waiting", "kv_blocks_used"))
        if not busy or time.monotonic() > deadline:
            return metrics
        time.sleep(0.5)


async def warm_up(server: ServerProcess) -> None:
    """One short request, so first-call allocations are not in the start figures."""
    async with grpc.aio.insecure_channel(server.grpc_url) as channel:
        call = pb_grpc.GRPCInferenceServiceStub(channel).ModelStreamInfer()
        await call.write(good_request("warmup", "Hello", {"temperature": 0, "max_tokens": 4}))
        while not (response := parse_response(await call.read())).final:
            if response.error:
                raise RuntimeError(f"warm-up failed: {response.error}")
        await call.done_writing()


# ---------------------------------------------------------------------------------- main


def _percentile(values: list[float], q: float) -> float | None:
    return float(np.percentile(values, q)) if values else None


@dataclass
class Check:
    name: str
    ok: bool
    detail: str


def _rss_check(growth: float, duration_s: float) -> Check:
    limit = f"{growth:+.1%} (limit ±{RSS_TOLERANCE:.0%})"
    if duration_s < RSS_MIN_DURATION_S:
        return Check("RSS end vs middle", True,
                     f"{limit}, not enforced: runs under {RSS_MIN_DURATION_S:.0f} s end in the "
                     "warm-up")
    return Check("RSS end vs middle", abs(growth) <= RSS_TOLERANCE, limit)


def invariants(result: dict[str, Any]) -> list[Check]:
    """The run's pass/fail checks, in report order."""
    rss = result["rss_kb"]
    growth = (rss["end"] - rss["middle"]) / rss["middle"]
    t = result["tally"]
    return [
        Check("lost finals", t["lost_finals"] == 0, str(t["lost_finals"])),
        Check("bad completions", t["bad_completions"] == 0, str(t["bad_completions"])),
        Check("poison without an error", t["poison_unrefused"] == 0, str(t["poison_unrefused"])),
        Check("poison with a wrong answer", t["poison_bad_answer"] == 0,
              str(t["poison_bad_answer"])),
        Check("KV blocks in use after", result["kv_blocks_used_after"] == 0,
              f"{result['kv_blocks_used_after']:.0f}"),
        _rss_check(growth, result["settings"]["duration_s"]),
        Check("log free of " + ", ".join(repr(s) for s in LOG_FORBIDDEN),
              not result["log_forbidden_hits"], str(result["log_forbidden_hits"])),
        Check("server exit status on SIGTERM", result["server_exit_code"] == 0,
              str(result["server_exit_code"])),
        Check("some requests completed", t["completed"] > 0, str(t["completed"])),
    ]


async def _drive(server: ServerProcess, settings: SoakSettings) -> tuple[Soak, Monitor, float]:
    soak = Soak(server, settings)
    monitor = Monitor(server, soak)
    monitor.sample()
    task = asyncio.create_task(monitor.run())
    try:
        await soak.run()
    finally:
        task.cancel()
    return soak, monitor, time.monotonic() - monitor.started


def run_soak(settings: SoakSettings, repository: Path = REPOSITORY) -> dict[str, Any]:
    """Starts the server, soaks it, stops it; returns the figures and the checks."""
    server = ServerProcess.start(repository)
    try:
        asyncio.run(warm_up(server))
        cpu = CpuShare(server.process.pid)
        soak, monitor, wall = asyncio.run(_drive(server, settings))
        cpu_share = cpu.stop()
        idle = wait_idle(server)
        end = monitor.sample()
    finally:
        exit_code = server.stop()
    log = server.log()
    t = soak.tally
    result: dict[str, Any] = {
        "benchmark": "soak",
        "timestamp": datetime.now(UTC).isoformat(),
        "settings": asdict(settings),
        "load_wall_s": wall,
        "tally": {k: v for k, v in asdict(t).items() if k != "ttfts_s"},
        "ttft_p50_s": _percentile(t.ttfts_s, 50),
        "ttft_p99_s": _percentile(t.ttfts_s, 99),
        "output_tokens_per_s": t.output_tokens / wall if wall else 0.0,
        "kv_blocks_used_after": idle.get("pagedserve_kv_blocks_used", float("nan")),
        "kv_blocks_total": idle.get("pagedserve_kv_blocks_total", float("nan")),
        "requests_running_after": idle.get("pagedserve_requests_running", float("nan")),
        "requests_waiting_after": idle.get("pagedserve_requests_waiting", float("nan")),
        "preemptions": idle.get("pagedserve_preemptions_total", float("nan")),
        "rss_kb": {"start": monitor.samples[0].rss_kb,
                   "middle": monitor.at(settings.duration_s / 2), "end": end.rss_kb,
                   "peak_sampled": max(s.rss_kb for s in monitor.samples)},
        "rss_samples": [asdict(s) for s in monitor.samples],
        "log_forbidden_hits": {s: log.count(s) for s in LOG_FORBIDDEN if s in log},
        "log_tracebacks": log.count("Traceback"),
        "server_log": str(server.log_path),
        "server_exit_code": exit_code,
        "cpu": cpu_share,
        "machine": {"platform": platform.platform(), "cpu_count": os.cpu_count(),
                    "loadavg_at_end": os.getloadavg()},
        "git": git_state(),
    }
    result["checks"] = [asdict(c) for c in invariants(result)]
    return result


def _ms(value: float | None) -> str:
    return "-" if value is None else f"{value * 1e3:.0f} ms"


def report(result: dict[str, Any], out: Callable[[str], None] = print) -> None:
    t, rss = result["tally"], result["rss_kb"]
    out("=" * 72)
    out(f"requests  sent {t['sent']}  completed {t['completed']}  cancelled {t['cancelled']}  "
        f"poison answered {t['poison_answered']}/{t['poison_sent']}")
    out(f"streams opened {t['streams_opened']}  output tokens {t['output_tokens']} "
        f"({result['output_tokens_per_s']:.1f}/s over {result['load_wall_s']:.0f} s)")
    out(f"TTFT      p50 {_ms(result['ttft_p50_s'])}  p99 {_ms(result['ttft_p99_s'])} "
        "(completed good requests)")
    out(f"RSS       start {rss['start'] / 1024:.0f} MiB  middle {rss['middle'] / 1024:.0f} MiB  "
        f"end {rss['end'] / 1024:.0f} MiB  peak sampled {rss['peak_sampled'] / 1024:.0f} MiB")
    out(f"KV blocks in use after {result['kv_blocks_used_after']:.0f} of "
        f"{result['kv_blocks_total']:.0f}; preemptions {result['preemptions']:.0f}")
    out(f"greedy disagreements {t['greedy_disagreements']} (reported, not enforced); "
        f"tracebacks in the server log {result['log_tracebacks']}")
    cpu = result["cpu"]
    out(f"CPU       server {cpu['server_cpu_s']:.0f} s, this client {cpu['client_cpu_s']:.0f} s, "
        f"other processes {cpu['others_cpu_s']:.0f} s "
        f"({cpu['others_fraction_of_machine']:.0%} of the machine) over {cpu['wall_s']:.0f} s")
    for kind, cases in t["examples"].items():
        for case in cases:
            out(f"  {kind}: {case}")
    for check in result["checks"]:
        out(f"{'OK  ' if check['ok'] else 'FAIL'} {check['name']}: {check['detail']}")
    out(f"server log: {result['server_log']}")
    out("=" * 72)


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n", 1)[0])
    parser.add_argument("--duration", type=float, default=600.0, help="seconds of load (600)")
    parser.add_argument("--streams", type=int, default=256, help="concurrent streams (256)")
    parser.add_argument("--cancel-fraction", type=float, default=0.2,
                        help="good requests cancelled mid-generation (0.2)")
    parser.add_argument("--poison-fraction", type=float, default=0.05,
                        help="requests that are poison (0.05)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--max-tokens", type=int, default=MAX_TOKENS,
                        help=f"largest max_tokens of a good request ({MAX_TOKENS}); each draws "
                             f"from {MIN_TOKENS} to this")
    parser.add_argument("--stall-timeout", type=float, default=STALL_TIMEOUT_S,
                        help="seconds without a response after which a request counts as lost "
                             f"({STALL_TIMEOUT_S:.0f})")
    parser.add_argument("--out", type=Path, default=DEFAULT_OUT,
                        help=f"where to write the JSON result (default: {DEFAULT_OUT})")
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    settings = SoakSettings(args.duration, args.streams, args.cancel_fraction,
                            args.poison_fraction, args.seed, args.max_tokens,
                            args.stall_timeout)
    print(f"soak: {settings.streams} streams for {settings.duration_s:.0f} s, "
          f"{settings.cancel_fraction:.0%} of good requests cancelled, "
          f"{settings.poison_fraction:.0%} poison, seed {settings.seed}", flush=True)
    result = run_soak(settings)
    report(result)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=2) + "\n")
    print(f"wrote {args.out}")
    return 0 if all(c["ok"] for c in result["checks"]) else 1


if __name__ == "__main__":
    sys.exit(main())
