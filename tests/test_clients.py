"""clients/stream.py and clients/load.py against real Triton's echo model (whose output is known
exactly) and against our server (which must generate exactly the requested tokens)."""

from __future__ import annotations

import asyncio
import subprocess
import sys
import tempfile
from collections.abc import Iterator
from pathlib import Path

import pytest

from clients.load import make_requests, run_load
from pagedserve.python_backend.host import wait_ready
from tests.server.conftest import MODEL, ServerHandle
from tests.triton_ref import make_echo_repository, running_triton

ROOT = Path(__file__).resolve().parent.parent
pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def triton_url() -> Iterator[str]:
    with tempfile.TemporaryDirectory() as tmp, \
            running_triton(make_echo_repository(Path(tmp), ["echo_vllm"])) as triton:
        yield triton.grpc_url


@pytest.fixture(scope="module")
def ours_url(server: ServerHandle) -> str:
    wait_ready(server.grpc_url)
    return server.grpc_url


def stream_cli(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "clients/stream.py", *args], cwd=ROOT,
                          capture_output=True, text=True, timeout=300)


def test_stream_cli_prints_the_streamed_text(triton_url):
    # The echo model streams the prompt back word by word, cut at max_tokens words.
    run = stream_cli("one two three four five", "--url", triton_url, "--model", "echo_vllm",
                     "--max-tokens", "3")
    assert run.returncode == 0, run.stderr
    assert run.stdout == "one two three \n"


def test_stream_cli_reports_server_errors(triton_url):
    run = stream_cli("hi", "--url", triton_url, "--model", "no_such_model")
    assert run.returncode == 1
    assert "Request for unknown model: 'no_such_model' is not found" in run.stderr


def test_stream_cli_against_our_server(ours_url):
    run = stream_cli("The capital of France is", "--url", ours_url, "--model", MODEL,
                     "--max-tokens", "8")
    assert run.returncode == 0, run.stderr
    assert run.stdout.strip()


def test_load_generator_matches_every_response_to_its_request(triton_url):
    requests = make_requests(24, max_tokens=3)
    report = asyncio.run(run_load(triton_url, "echo_vllm", requests, streams=5, concurrency=8))
    assert (report.num_requests, report.streams, report.concurrency) == (24, 5, 8)
    for req in requests:
        # Echo of the first three words of the prompt ("[i] <first> <second> ...").
        assert report.texts[req.request_id] == "".join(
            w + " " for w in req.prompt.split()[:3])
    assert report.output_tokens == 24 * 3  # one word per streamed response
    assert len(report.ttfts_s) == 24
    assert 0 < report.ttft_p50_s <= report.latency_p50_s <= report.latency_p95_s


def test_load_generator_against_our_server(ours_url):
    requests = make_requests(8, max_tokens=4)
    report = asyncio.run(run_load(ours_url, MODEL, requests, streams=3))
    # ignore_eos: every request generates exactly max_tokens tokens.
    assert report.output_tokens == 8 * 4
    assert all(report.texts[r.request_id] for r in requests)
    assert report.tokens_per_s > 0
