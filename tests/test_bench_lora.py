"""The LoRA benchmark runs end to end on a small workload and records its three cases."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from pagedserve.bench import lora


@pytest.mark.slow
def test_quick_lora_bench_records_its_cases(tmp_path: Path) -> None:
    out = tmp_path / "lora.json"
    assert lora.main(["--quick", "--repeat", "1", "--out", str(out)]) == 0
    result = json.loads(out.read_text())
    assert set(result["runs"]) == {"base", "mixed", "lora-idle"}
    generated = {case: runs[0]["generated_tokens"] for case, runs in result["runs"].items()}
    spec = result["spec"]
    assert set(generated.values()) == {spec["requests"] * spec["output_len"]}
    assert result["mixed_over_base"] > 0 and result["isa"]
