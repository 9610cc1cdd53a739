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
    # EOS is ignored: both paths generate exactly the requested tokens.
    for path in ("grpc", "direct"):
        (phase,) = result[path]
        assert phase["output_tokens"] == expected_tokens, path
        assert phase["tokens_per_s"] > 0 and 0 < phase["ttft_p50_s"] <= phase["latency_p50_s"]
    assert result["ratio_grpc_over_direct"] == pytest.approx(
        result["grpc_tokens_per_s"] / result["direct_tokens_per_s"])
    assert result["ttft_overhead_p50_s"] == pytest.approx(
        result["grpc_ttft_p50_s"] - result["direct_ttft_p50_s"])
    sequential = result["sequential_workload"]
    for key in ("sequential_grpc", "sequential_direct"):
        assert len(result[key]) == 2  # two rounds per --rounds
        for phase in result[key]:
            assert phase["output_tokens"] == (sequential["num_requests"]
                                              * sequential["max_tokens"])
            assert len(phase["ttfts_s"]) == sequential["num_requests"]
    assert result["server_exit_code"] == 0  # SIGTERM is a clean shutdown
    assert "ratio" in run.stdout and "TTFT overhead p50" in run.stdout
