"""The serving benchmark runs end to end in quick mode: both paths generate the whole workload."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest


@pytest.mark.slow
def test_serve_quick_writes_its_figures(tmp_path):
    out = tmp_path / "serve.json"
    run = subprocess.run([sys.executable, "-m", "pagedserve.bench.serve", "--quick", "--out",
                          str(out)],
                         capture_output=True, text=True, timeout=900)
    assert run.returncode == 0, run.stderr[-3000:]
    result = json.loads(out.read_text())
    assert result["quick"] is True
    workload = result["workload"]
    expected_tokens = workload["num_requests"] * workload["max_tokens"]
    # EOS is ignored: every path generates exactly the requested tokens.
    assert set(result["phases"]) == {"direct", "grpc", "kserve-http", "openai"}
    for path, (phase,) in result["phases"].items():
        assert phase["output_tokens"] == expected_tokens, path
        assert phase["tokens_per_s"] > 0 and 0 < phase["ttft_p50_s"] <= phase["latency_p50_s"]
    sequential = result["sequential_workload"]
    for path, phases in result["sequential_phases"].items():
        assert len(phases) == 2, path  # two rounds per --rounds
        for phase in phases:
            assert phase["output_tokens"] == sequential["num_requests"] * sequential["max_tokens"]
            assert len(phase["ttfts_s"]) == sequential["num_requests"]
    direct = result["direct"]
    for door, figures in result["doors"].items():
        assert figures["ratio_over_direct"] == pytest.approx(
            figures["tokens_per_s"] / direct["tokens_per_s"]), door
        assert figures["ttft_overhead_p50_s"] == pytest.approx(
            figures["ttft_p50_s"] - direct["ttft_p50_s"]), door
    assert result["server_exit_code"] == 0  # SIGTERM is a clean shutdown
    assert "over direct" in run.stdout and "TTFT overhead p50" in run.stdout


def test_an_unknown_door_is_refused():
    run = subprocess.run([sys.executable, "-m", "pagedserve.bench.serve", "--protocol", "ftp"],
                         capture_output=True, text=True, timeout=300)
    assert run.returncode == 2 and "--protocol takes grpc, kserve-http, openai" in run.stderr
