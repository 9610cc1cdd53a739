"""The throughput benchmark runs end to end in quick mode and writes its result."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest


@pytest.mark.slow
def test_throughput_quick_writes_its_figures(tmp_path):
    out = tmp_path / "throughput.json"
    run = subprocess.run([sys.executable, "-m", "pagedserve.bench.throughput", "--quick", "--out",
                          str(out)],
                         capture_output=True, text=True, timeout=600)
    assert run.returncode == 0, run.stderr[-2000:]
    result = json.loads(out.read_text())
    assert result["quick"] is True
    assert result["engine"]["generated_tokens"] == result["workload"]["output_tokens"]
    assert result["baseline"]["generated_tokens"] == result["workload"]["output_tokens"]
    for key in ("ratio_engine_over_baseline", "engine_mfu"):
        assert result[key] > 0
    assert result["engine"]["num_decoded_tokens"] > 0
    assert "ratio" in run.stdout and "MFU" in run.stdout


@pytest.mark.slow
def test_sharing_quick_writes_its_figures(tmp_path):
    out = tmp_path / "sharing.json"
    run = subprocess.run([sys.executable, "-m", "pagedserve.bench.sharing", "--quick", "--out",
                          str(out)],
                         capture_output=True, text=True, timeout=600)
    assert run.returncode == 0, run.stderr[-2000:]
    result = json.loads(out.read_text())
    prefix = result["prefix"]
    assert prefix["outputs_identical"] is True
    # One request computes the shared prefix; the others find it cached.
    spec = result["spec"]
    assert prefix["on"]["num_prefilled_tokens"] == (
        spec["prefix_len"] + spec["prefix_requests"] * spec["unique_len"])
    assert prefix["off"]["num_prefilled_tokens"] >= spec["prefix_requests"] * (
        spec["prefix_len"] + spec["unique_len"])
    for case in ("beam_search", "parallel_sampling"):
        assert 0 < result[case]["peak_blocks_used"] < result[case]["peak_blocks_unshared"]
    assert "fewer prefilled tokens" in run.stdout
