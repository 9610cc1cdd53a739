"""``bench/perf_analyzer.sh`` (Triton's perf_analyzer, decoupled streaming over gRPC) runs
against real Triton's echo model and against our server, and reports throughput and latency."""

from __future__ import annotations

import csv
import json
import subprocess
import tempfile
from collections.abc import Iterator
from pathlib import Path

import pytest

from pagedserve.python_backend.host import wait_ready
from tests.server.conftest import MODEL
from tests.triton_ref import make_echo_repository, running_triton

ROOT = Path(__file__).resolve().parent.parent
SCRIPT = ROOT / "bench" / "perf_analyzer.sh"
INPUT = ROOT / "clients" / "perf_analyzer_input.json"


@pytest.fixture(params=["triton", "pagedserve"])
def served(request: pytest.FixtureRequest) -> Iterator[tuple[str, str]]:
    """(gRPC url, model) of a running server of either kind."""
    if request.param == "triton":
        with tempfile.TemporaryDirectory() as tmp, \
                running_triton(make_echo_repository(Path(tmp), ["echo_vllm"])) as triton:
            yield triton.grpc_url, "echo_vllm"
    else:
        server = request.getfixturevalue("server")
        wait_ready(server.grpc_url)
        yield server.grpc_url, MODEL


def short_input(tmp_path: Path) -> Path:
    """The clients/ input file with 4-token requests, so a CPU-generated run stays short."""
    data = json.loads(INPUT.read_text())
    for row in data["data"]:
        row["sampling_parameters"] = [json.dumps({"max_tokens": 4, "temperature": 0})]
    path = tmp_path / "input.json"
    path.write_text(json.dumps(data))
    return path


@pytest.mark.slow
def test_perf_analyzer_streams_and_reports(served, tmp_path):
    url, model = served
    out = tmp_path / "pa.csv"
    run = subprocess.run(
        ["bash", str(SCRIPT), "-u", url, "-m", model, "-c", "1", "-d", str(short_input(tmp_path)),
         "-f", str(out), "--", "--measurement-mode", "count_windows",
         # The machine is shared and noisy: what is tested is that perf_analyzer drives the
         # server and reports, not that latency is stable, so any variation is accepted.
         "--measurement-request-count", "6", "-r", "3", "-s", "10000"],
        capture_output=True, text=True, timeout=600)
    assert run.returncode == 0, run.stdout[-3000:] + run.stderr[-3000:]
    assert "Throughput:" in run.stdout and "p50 latency" in run.stdout
    (row,) = list(csv.DictReader(out.open()))
    assert row["Concurrency"] == "1"
    assert float(row["Inferences/Second"]) > 0
    # Several responses per request (streamed tokens): response rate above the request rate.
    assert float(row["Response Throughput"]) > float(row["Inferences/Second"])
    assert int(row["p50 latency"]) > 0
