"""The soak benchmark runs end to end for a few seconds: nothing lost, every block back."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest

from pagedserve.bench.soak import poisons


@pytest.mark.slow
def test_short_soak_keeps_its_invariants(tmp_path):
    out = tmp_path / "soak.json"
    command = [sys.executable, "-m", "pagedserve.bench.soak", "--duration", "4", "--streams", "6",
               "--cancel-fraction", "0.3", "--poison-fraction", "0.2", "--max-tokens", "16",
               "--out", str(out)]
    run = subprocess.run(command, capture_output=True, text=True, timeout=300)
    assert run.returncode == 0, run.stdout[-3000:] + run.stderr[-3000:]
    result = json.loads(out.read_text())
    tally = result["tally"]
    assert tally["lost_finals"] == 0 and tally["bad_completions"] == 0
    assert result["kv_blocks_used_after"] == 0
    assert tally["completed"] > 0
    # The first stream sends every poison class once: each was answered with its error.
    assert set(tally["poison_by_class"]) == {p.name for p in poisons()}
    assert tally["poison_answered"] == tally["poison_sent"]
    assert tally["poison_unrefused"] == 0 and tally["poison_bad_answer"] == 0
    assert result["server_exit_code"] == 0
    assert "lost finals: 0" in run.stdout
