"""``pagedserve.bench.serving --quick``: our server alone through the benchmark's own client, and
peers that are not built reported missing with how to build them."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from pagedserve.bench import peer_venvs, serving

pytestmark = pytest.mark.slow


def test_quick_serving_bench_measures_our_server(tmp_path: Path) -> None:
    out = tmp_path / "serving.json"
    assert serving.main(["--quick", "--out", str(out)]) == 0
    result = json.loads(out.read_text())
    ours = result["systems"]["ours-fp32"]
    assert ours["status"] == "ran"
    assert set(ours["cells"]) == {"short@1", "short@4"}
    for cell in ours["cells"].values():
        # Every request streamed all its tokens (EOS ignored), and the first came before the
        # last: the client's figures are of real streams.
        assert cell["output_tokens"] == cell["requests"] * result["max_tokens"]
        assert cell["tokens_per_s"] > 0
        assert cell["ttft_p50_s"] is not None and cell["ttft_p50_s"] <= cell["wall_s"]
        assert cell["itl_p50_s"] is not None
    assert result["ratios"] == {}  # no peer ran


def test_peers_that_are_not_built_are_reported_missing(tmp_path: Path,
                                                       monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(peer_venvs, "VENVS_DIR", tmp_path)
    for system, command in (("llama-server", "peer_venvs llama-server"),
                            ("vllm", "peer_venvs vllm")):
        problem = serving.missing(system)
        assert problem is not None and command in problem
    assert serving.missing("ours-gguf") is None
