"""The structured-outputs benchmark runs end to end on a small workload and records its two
cases, every constrained output ending with its grammar and parsing as JSON."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from pagedserve.bench import structured


@pytest.mark.slow
def test_quick_structured_bench_records_its_cases(tmp_path: Path) -> None:
    out = tmp_path / "structured.json"
    assert structured.main(["--quick", "--repeat", "1", "--out", str(out)]) == 0
    result = json.loads(out.read_text())
    assert set(result["runs"]) == {"free", "half"}
    spec = result["spec"]
    free, half = result["runs"]["free"][0], result["runs"]["half"][0]
    # EOS ignored: every unconstrained request runs to max_tokens, in either case.
    assert free["generated_tokens"] == spec["requests"] * spec["output_len"]
    assert free["free_tokens"] == half["free_tokens"] == spec["requests"] // 2 * spec["output_len"]
    assert free["constrained"] == 0
    assert half["constrained"] == half["stopped"] == half["parsed"] == spec["requests"] // 2
    assert result["outputs"]["parsed"] == spec["requests"] // 2
    for ratio in ("half_over_free", "free_requests_half_over_free",
                  "full_batch_half_over_free"):
        assert isinstance(result[ratio], float) and result[ratio] > 0
    assert result["compile"]["cold_s"] > 0 and result["isa"]
