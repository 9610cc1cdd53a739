"""pagedserve.bench.block_kernels: both layouts of each product timed, and their ratio."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from pagedserve.bench import block_kernels
from pagedserve.kernels import cpu


@pytest.mark.skipif(not cpu.available(), reason="no C compiler for the kernels")
def test_quick_run_times_both_layouts(tmp_path: Path, capsys: pytest.CaptureFixture[str]
                                      ) -> None:
    out = tmp_path / "block_kernels.json"
    assert block_kernels.main(["--quick", "--out", str(out)]) == 0
    result = json.loads(out.read_text())
    rows = result["rows"]
    assert {(r["product"], r["rows"]) for r in rows} == {
        (p, n) for p in ("qkv", "output") for n in (1, 8)}
    assert {r["packed_kind"] for r in rows} == {"q4_1x8", "q8_0x8"}
    for row in rows:
        assert row["plain_s"] > 0 and row["packed_s"] > 0
        assert row["ratio"] == pytest.approx(row["plain_s"] / row["packed_s"])
    assert "plain/packed" in capsys.readouterr().out
