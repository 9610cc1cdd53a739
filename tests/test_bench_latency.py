"""The latency benchmark and the peer runners' pieces that run without the peers' venvs."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest

from pagedserve.bench import latency, peer_venvs, throughput_vllm
from pagedserve.bench.latency import StreamSummary
from pagedserve.bench.peers import (
    jobs,
    llamacpp_perplexity,
    llamacpp_stream,
    vllm_batch,
    vllm_engine,
)
from pagedserve.bench.throughput import Request


@pytest.mark.slow
def test_latency_quick_runs_our_engine_and_records_its_figures(tmp_path, capsys):
    out = tmp_path / "latency.json"
    assert latency.main(["--quick", "--out", str(out)]) == 0
    result = json.loads(out.read_text())
    assert result["quick"] is True and result["settings"]["max_tokens"] == 8
    assert set(result["systems"]) == {"ours-fp32", "ours-int8"}
    for name, system in result["systems"].items():
        assert system["status"] == "ok", system["reason"]
        assert system["cpu_contention"]["wall_s"] > 0
        for set_name in latency.SETS:
            summary = system["sets"][set_name]["summary"]
            assert summary["prompts"] == 1 and summary["generated_tokens"] == 8
            assert summary["decode_tokens_per_s"] > 0 and summary["ttft_ms_mean"] > 0
            (stream,) = system["sets"][set_name]["streams"]
            assert len(stream["token_ids"]) == 8
            assert stream["token_times_s"] == sorted(stream["token_times_s"])
            ratios = result["ratios"][set_name][name]
            assert ratios["decode_vs_llamacpp"] is None  # the baseline did not run
            assert ratios["decode_vs_ours_fp32"] > 0
    assert result["ratios"]["chat"]["ours-fp32"]["decode_vs_ours_fp32"] == 1.0
    int8 = result["agreement"]["chat"]["ours-int8"]["ours-fp32"]
    assert int8["tokens"] == 8 and int8["prompts"] == 1
    assert "decode tok/s" in capsys.readouterr().out


def test_missing_peer_venvs_are_reported_with_how_to_build_them(tmp_path, monkeypatch, capsys):
    monkeypatch.setattr(peer_venvs, "VENVS_DIR", tmp_path)
    out = tmp_path / "latency.json"
    assert latency.main(["--systems", "llamacpp-q4_1,vllm-fp32", "--out", str(out)]) == 0
    systems = json.loads(out.read_text())["systems"]
    for name, venv in (("llamacpp-q4_1", "llamacpp"), ("vllm-fp32", "vllm")):
        assert systems[name]["status"] == "missing"
        assert f"python -m pagedserve.bench.peer_venvs {venv}" in systems[name]["reason"]
        assert systems[name]["sets"] is None
    assert "--setup-peers" in capsys.readouterr().out


def test_a_venv_without_its_engine_is_not_ready(tmp_path):
    bin_dir = tmp_path / "llamacpp" / "bin"
    bin_dir.mkdir(parents=True)
    (bin_dir / "python").symlink_to(sys.executable)  # an interpreter without llama_cpp
    problem = peer_venvs.peer_problem("llamacpp", tmp_path)
    assert problem is not None and "lacks llama_cpp" in problem
    with pytest.raises(ValueError, match="peer must be one of"):
        peer_venvs.peer_problem("llama", tmp_path)


def test_a_failing_runner_is_reported_with_its_error(tmp_path, monkeypatch):
    # A "peer" whose venv is this interpreter: its runner starts, and refuses the job.
    bin_dir = tmp_path / "fake" / "bin"
    bin_dir.mkdir(parents=True)
    (bin_dir / "python").symlink_to(sys.executable)
    monkeypatch.setitem(peer_venvs.PEERS, "fake",
                        peer_venvs.Peer("fake", "json", (), (), ()))
    with pytest.raises(peer_venvs.PeerError, match="job field 'model' is missing"):
        peer_venvs.run_peer("fake", "llamacpp_stream", {"prompts": [[1]]}, root=tmp_path)
    with pytest.raises(peer_venvs.PeerError, match="no venv"):
        peer_venvs.run_peer("vllm", "vllm_stream", {}, root=tmp_path)


def test_jobs_are_checked_field_by_field(tmp_path):
    path = tmp_path / "job.json"
    fields = {"model": str, "prompts": list, "max_tokens": int}
    for job, message in (([1], "a JSON object"),
                         ({"prompts": [[1]], "max_tokens": 2}, "'model' is missing"),
                         ({"model": "m", "prompts": [[1]], "max_tokens": True}, "'max_tokens'"),
                         ({"model": "m", "prompts": [[]], "max_tokens": 2}, "'prompts'"),
                         ({"model": "m", "prompts": [["a"]], "max_tokens": 2}, "'prompts'")):
        path.write_text(json.dumps(job))
        with pytest.raises(ValueError, match=message):
            jobs.read_job(path, fields)
    path.write_text(json.dumps({"model": "m", "prompts": [[1, 2]], "max_tokens": 2}))
    assert jobs.read_job(path, fields)["prompts"] == [[1, 2]]
    args = jobs.parse_args("runner", [str(path), str(tmp_path / "out.json")])
    assert args.job == path and args.out == tmp_path / "out.json"
    with pytest.raises(ValueError, match="2 tokens but 1 arrival"):
        jobs.stream_record([1, 2], [0.1])


def test_batch_jobs_need_one_output_length_per_prompt():
    job = {"prompts": [[1], [2]], "output_lens": [4, 4], "warmup_prompts": [[1]],
           "warmup_output_lens": [2], "repeat": 1}
    vllm_batch.check_lengths(job)
    with pytest.raises(ValueError, match="'output_lens' has 1 entries for 2 prompts"):
        vllm_batch.check_lengths({**job, "output_lens": [4]})
    with pytest.raises(ValueError, match="'warmup_output_lens' must hold positive"):
        vllm_batch.check_lengths({**job, "warmup_output_lens": [0]})
    with pytest.raises(ValueError, match="'repeat' must be positive"):
        vllm_batch.check_lengths({**job, "repeat": 0})


def test_vllm_gets_its_thread_binding_and_its_kv_cache_in_gib():
    env = vllm_engine.vllm_env("auto", 1)
    assert env == {"VLLM_CPU_KVCACHE_SPACE": "1", "VLLM_CPU_OMP_THREADS_BIND": "auto"}
    with pytest.raises(ValueError, match="omp_threads_bind must be"):
        vllm_engine.vllm_env(" ", 1)
    with pytest.raises(ValueError, match="kv_cache_gib must be positive"):
        vllm_engine.vllm_env("auto", 0)


class _EndlessLlama:
    """Stands in for llama_cpp.Llama: ``generate`` yields tokens for ever, as the real one."""

    def generate(self, tokens, **kwargs):
        assert kwargs["temp"] == 0.0 and kwargs["repeat_penalty"] == 1.0
        token = tokens[-1]
        while True:
            token += 1
            yield token


def test_llamacpp_stream_takes_exactly_max_tokens():
    record = llamacpp_stream.stream(_EndlessLlama(), [5, 6], 4)
    assert record["token_ids"] == [7, 8, 9, 10]
    assert record["token_times_s"] == sorted(record["token_times_s"])


def test_llamacpp_perplexity_is_ours_computed_on_its_scores():
    """The peer's perplexity (numpy, in its venv) is the cross-entropy ours is computed with."""
    import numpy as np
    import torch
    import torch.nn.functional as F

    generator = torch.Generator().manual_seed(0)
    scores = torch.randn(9, 50, generator=generator) * 3
    token_ids = torch.randint(0, 50, (9,), generator=generator).tolist()
    expected = float(torch.exp(F.cross_entropy(scores[:-1].double(),
                                               torch.tensor(token_ids[1:]))))
    got = llamacpp_perplexity.perplexity(np.asarray(scores.numpy()), token_ids)
    assert got == pytest.approx(expected, rel=1e-9)


def test_stream_figures_ratios_and_agreement():
    streams = [jobs.stream_record([1, 2, 3], [0.1, 0.2, 0.3]),
               jobs.stream_record([1, 2, 3, 4, 5], [0.3, 0.4, 0.5, 0.6, 0.7])]
    s = latency.summarize(streams)
    assert s.generated_tokens == 8 and s.prompts == 2
    assert s.decode_tokens_per_s == pytest.approx(6 / 0.6)
    assert s.tpot_ms == pytest.approx(100.0)
    assert s.ttft_ms_mean == pytest.approx(200.0)
    with pytest.raises(ValueError, match="at least 2 tokens"):
        latency.summarize([jobs.stream_record([1], [0.1])])
    base = StreamSummary(1, 3, 5.0, 200.0, 100.0, 100.0)
    ours = StreamSummary(1, 3, 10.0, 100.0, 50.0, 50.0)
    r = latency.ratios({latency.BASELINE: base, latency.REFERENCE: ours})
    assert r[latency.REFERENCE] == {"decode_vs_llamacpp": 2.0, "decode_vs_ours_fp32": 1.0,
                                    "ttft_vs_llamacpp": 0.5}
    a = latency.agreement([[1, 2, 3, 4], [1, 2, 3, 4]], [[1, 2, 3, 9], [1, 7, 3, 4]], 3)
    assert a == {"tokens": 3, "prompts": 2, "identical_prompts": 1, "mean_common_prefix": 2.0}


def test_vllm_throughput_job_and_summary():
    requests = [Request([1, 2, 3], 4), Request([4, 5], 2)]
    job = throughput_vllm.vllm_job(requests, repeat=2)
    assert job["prompts"] == [[1, 2, 3], [4, 5]] and job["output_lens"] == [4, 2]
    assert job["kv_cache_gib"] == 1 and job["max_num_seqs"] == 64
    assert job["omp_threads_bind"] == "auto"
    assert len(job["warmup_prompts"]) == len(job["warmup_output_lens"])
    assert Path(job["model"], "config.json").is_file()
    result = {"walls_s": [2.0, 1.5], "outputs": [[1] * 4, [1] * 2],
              "cpu_contention": [{"run": 0}, {"run": 1}]}
    summary = throughput_vllm.vllm_summary(result, requests)
    assert summary["wall_s"] == 1.5 and summary["tokens_per_s"] == 4.0
    assert summary["contention"] == {"run": 1}
    with pytest.raises(RuntimeError, match="vLLM generated 5 tokens, 6 requested"):
        throughput_vllm.vllm_summary({**result, "outputs": [[1] * 4, [1]]}, requests)
