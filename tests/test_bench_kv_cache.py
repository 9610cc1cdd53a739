"""pagedserve.bench.kv_cache: decode attention timed over each cache dtype, with the ratios."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from pagedserve.bench import kv_cache
from pagedserve.kernels import cpu


@pytest.mark.skipif(not cpu.available(), reason="no C compiler for the kernels")
def test_quick_run_times_every_cache_dtype(tmp_path: Path, capsys: pytest.CaptureFixture[str]
                                           ) -> None:
    out = tmp_path / "kv_cache.json"
    assert kv_cache.main(["--quick", "--out", str(out)]) == 0
    rows = json.loads(out.read_text())["rows"]
    assert [(r["context"], r["cache"]) for r in rows] == [
        (128, "fp32"), (128, "fp16"), (128, "bf16")]
    fp32 = rows[0]
    for row in rows:
        assert row["step_s"] > 0
        assert row["ratio"] == pytest.approx(fp32["step_s"] / row["step_s"])
        assert row["bytes"] * (2 if row["cache"] != "fp32" else 1) == fp32["bytes"]
    assert "fp32 cache / this one" in capsys.readouterr().out
