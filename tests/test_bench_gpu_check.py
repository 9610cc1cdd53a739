"""pagedserve.bench.gpu_check runs every step in its CPU smoke mode (kernels interpreted, tiny
shapes)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from pagedserve.bench import gpu_check


@pytest.mark.slow
def test_gpu_check_smoke_runs_every_step(tmp_path: Path, capsys: pytest.CaptureFixture[str]
                                         ) -> None:
    out = tmp_path / "gpu_check.json"
    assert gpu_check.main(["--smoke", "--out", str(out)]) == 0
    result = json.loads(out.read_text())
    assert result["smoke"] is True and result["copy_bandwidth_bytes_per_s"] > 0
    rows = {r["name"]: r for r in result["rows"]}
    assert rows["kernel tests"]["note"].startswith("passed: 2 passed")
    kernel_rows = [r for r in result["rows"] if r["bytes_moved"] is not None]
    assert len(kernel_rows) == 5
    for row in kernel_rows:
        assert row["triton_ms"] > 0 and row["torch_ms"] > 0 and row["fraction_of_copy"] > 0
    # The two attention shapes and the LoRA delta agree with the torch path.
    for row in [*kernel_rows[:2], rows["LoRA delta (q|k|v)"]]:
        assert float(row["note"].rsplit(" ", 1)[1]) < 1e-2
    assert rows["greedy = transformers (fp32)"]["note"] == "2/2 prompts identical"
    assert rows["beam search = transformers (fp32)"]["note"] == "width 3: 2/2 prompts identical"
    assert all(r["passed"] is not False for r in result["rows"])
    engine = rows["engine vs transformers (bf16)"]
    assert engine["triton_ms"] > 0 and engine["torch_ms"] > 0
    table = capsys.readouterr().out
    assert "device-to-device copy" in table and "engine vs transformers" in table


def test_gpu_check_fails_when_a_check_fails(monkeypatch: pytest.MonkeyPatch,
                                             capsys: pytest.CaptureFixture[str]) -> None:
    """Every check passing but the attention error exits non-zero, naming the failed row."""
    def attention(name: str, *args: object) -> gpu_check.Row:
        error = 0.5 if name.startswith("prefill") else 1e-3
        return gpu_check.Row(name, note=f"rel. error {error}",
                             passed=error < gpu_check.ATTENTION_TOLERANCE)

    monkeypatch.setattr(gpu_check, "kernel_tests",
                        lambda smoke: gpu_check.Row("kernel tests", passed=True))
    monkeypatch.setattr(gpu_check, "copy_bandwidth", lambda *args: 1e9)
    monkeypatch.setattr(gpu_check, "attention_row", attention)
    monkeypatch.setattr(gpu_check, "rotary_row", lambda *args: gpu_check.Row("rotary"))
    monkeypatch.setattr(gpu_check, "norm_row", lambda *args: gpu_check.Row("norm"))
    monkeypatch.setattr(gpu_check, "engine_rows",
                        lambda *args: [gpu_check.Row("greedy", passed=True)])
    assert gpu_check.main(["--smoke"]) == 1
    captured = capsys.readouterr()
    assert "rel. error 0.5" in captured.out  # the table is still printed
    assert captured.err.strip() == "FAILED: prefill 1 x 20"
