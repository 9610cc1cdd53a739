"""Hostile HTTP clients: oversized bodies, slowloris headers and bodies, and a flood of idle
connections are refused or shed, and the server keeps serving others throughout.

A server of its own with small limits: 1 MiB bodies, a 2 s idle timeout, 200 connections.
"""

from __future__ import annotations

import asyncio
import json
import socket
import time
import urllib.request
from collections.abc import Iterator

import pytest
from aiohttp import web

from pagedserve.server.http.listener import HttpListener, HttpSettings
from tests.server.conftest import DEFAULT_REPOSITORY, MODEL, ServerHandle, start_server

pytestmark = pytest.mark.slow
BODY_LIMIT = 2**20
IDLE = 2
CAP = 200


@pytest.fixture(scope="module")
def guarded() -> Iterator[ServerHandle]:
    handle = start_server(DEFAULT_REPOSITORY, "--http-max-input-size", str(BODY_LIMIT),
                          "--http-idle-timeout", str(IDLE), "--http-max-connections", str(CAP))
    yield handle
    assert handle.stop() == 0


def _post(server: ServerHandle, path: str, body: bytes) -> tuple[int, dict[str, object]]:
    request = urllib.request.Request(server.http_url + path, data=body,
                                     headers={"Content-Type": "application/json"})
    try:
        with urllib.request.urlopen(request, timeout=120) as r:
            return r.status, json.loads(r.read() or b"{}")
    except urllib.error.HTTPError as e:
        return e.code, json.loads(e.read())


def _healthy(server: ServerHandle) -> bool:
    return server.http_get("/v2/health/ready")[0] == 200


def _closed(sock: socket.socket) -> bytes:
    """What the server sent before closing the connection (it must close it)."""
    received = b""
    while chunk := sock.recv(65536):
        received += chunk
    return received


def test_oversized_bodies_get_413_on_every_door(guarded: ServerHandle) -> None:
    big = b'{"text_input": "' + b"x" * (BODY_LIMIT + 10) + b'"}'
    status, error = _post(guarded, f"/v2/models/{MODEL}/generate", big)
    assert status == 413 and "--http-max-input-size" in str(error["error"])
    status, error = _post(guarded, f"/v2/models/{MODEL}/infer", big)
    assert status == 413
    status, error = _post(guarded, "/v1/completions", big)
    assert status == 413 and error["error"]["code"] == 413  # type: ignore[index]
    assert _healthy(guarded)


def test_slowloris_headers_and_bodies_are_cut(guarded: ServerHandle) -> None:
    header = b"GET /v2/health/live HTTP/1.1\r\nHost: x\r\n"
    with socket.create_connection(("127.0.0.1", guarded.http_port), timeout=60) as trickler:
        trickle = (header * 4)[:120]  # 30 s at 4 bytes a second: far past the idle timeout
        sent = 0
        try:
            # One header byte at a time, each well inside the idle timeout: still cut once
            # the header has taken longer than it, while others are served.
            for byte in trickle:
                trickler.sendall(bytes([byte]))
                sent += 1
                time.sleep(0.25)
                if sent % 8 == 0:
                    assert _healthy(guarded)
        except (BrokenPipeError, ConnectionResetError):
            pass
        assert sent < len(trickle), "the trickling connection was never closed"
    body = json.dumps({"text_input": "hi"}).encode()
    with socket.create_connection(("127.0.0.1", guarded.http_port), timeout=60) as slow:
        slow.sendall(b"POST /v2/models/" + MODEL.encode() + b"/generate HTTP/1.1\r\nHost: x\r\n"
                     b"Content-Length: " + str(len(body)).encode() + b"\r\n\r\n" + body[:3])
        answer = _closed(slow)
    assert answer.startswith(b"HTTP/1.1 408"), answer[:200]
    assert _healthy(guarded)


def test_a_flood_of_idle_connections_is_shed_and_the_server_recovers(
        guarded: ServerHandle) -> None:
    flood = [socket.create_connection(("127.0.0.1", guarded.http_port), timeout=60)
             for _ in range(1000)]
    try:
        # Each ends one of two ways: answered 503 at once (beyond the cap), or accepted and
        # closed by the idle timeout. None is held, none gets anything else.
        endings = [_closed(sock) for sock in flood]
    finally:
        for sock in flood:
            sock.close()
    shed = sum(e.startswith(b"HTTP/1.1 503") for e in endings)
    idle = sum(e == b"" for e in endings)
    assert shed + idle == len(flood) and shed > 0 and idle > 0, (shed, idle)
    assert _healthy(guarded)
    status, _ = _post(guarded, f"/v2/models/{MODEL}/generate",
                      json.dumps({"text_input": "Hi", "parameters": {"max_tokens": 2}}).encode())
    assert status == 200


def test_a_burst_of_connections_past_the_cap_is_shed() -> None:
    """Connections that queue while the server is busy are accepted in one burst, whose
    protocols are all made before any is connected: the cap must count them all the same."""
    cap, burst = 5, 40

    async def main() -> list[bytes]:
        listener = HttpListener(web.Application(), "127.0.0.1", 0,
                                HttpSettings(idle_timeout=30, max_connections=cap))
        await listener.start()
        try:
            # The loop is held while the connections queue in the listener's backlog.
            socks = [socket.create_connection(("127.0.0.1", listener.port), timeout=60)
                     for _ in range(burst)]
            await asyncio.sleep(0.5)  # accepted now, in one burst
            for sock in socks:
                sock.settimeout(0.5)
            answers = []
            for sock in socks:
                try:
                    answers.append(sock.recv(200))
                except TimeoutError:
                    answers.append(b"")  # accepted, waiting for its request
                sock.close()
            return answers
        finally:
            await listener.stop()

    answers = asyncio.run(main())
    shed = sum(a.startswith(b"HTTP/1.1 503") for a in answers)
    assert shed == burst - cap and answers.count(b"") == cap, answers
