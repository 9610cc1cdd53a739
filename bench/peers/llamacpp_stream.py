"""One stream through llama.cpp (``llama-cpp-python``): each prompt alone, greedy, timed per token.

Job: ``model`` (a GGUF file), ``prompts`` (token ids), ``warmup_prompt``, ``max_tokens``,
``threads``, ``n_ctx``. ``Llama.generate`` yields each token as it is sampled and never stops by
itself (EOS included), so every prompt gets exactly ``max_tokens``: the first one's time is the
time to first token (prefill and one sample), the rest are decode steps. Like the other engines,
it reuses the KV of the longest prefix shared with the previous prompt (the chat template's).
"""

from __future__ import annotations

import sys
import time
from typing import Any

from ..cpu_steal import ContentionMonitor
from .jobs import package_versions, parse_args, read_job, stream_record, write_result

FIELDS = {"model": str, "prompts": list, "warmup_prompt": list, "max_tokens": int,
          "threads": int, "n_ctx": int}


def stream(llm: Any, prompt: list[int], max_tokens: int) -> dict[str, Any]:
    """Greedy tokens of ``prompt`` with their arrival times."""
    token_ids: list[int] = []
    times: list[float] = []
    start = time.perf_counter()
    # temp 0 is llama.cpp's greedy sampler; the penalties are off by being neutral.
    for token in llm.generate(prompt, temp=0.0, repeat_penalty=1.0, frequency_penalty=0.0,
                              presence_penalty=0.0, reset=True):
        times.append(time.perf_counter() - start)
        token_ids.append(int(token))
        if len(token_ids) == max_tokens:
            break
    return stream_record(token_ids, times)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(__doc__.split("\n", 1)[0], argv)
    job = read_job(args.job, FIELDS)
    from llama_cpp import Llama

    llm = Llama(model_path=job["model"], n_ctx=job["n_ctx"], n_threads=job["threads"],
                n_threads_batch=job["threads"], seed=0, verbose=False)
    stream(llm, job["warmup_prompt"], min(8, job["max_tokens"]))
    monitor = ContentionMonitor()
    streams = [stream(llm, prompt, job["max_tokens"]) for prompt in job["prompts"]]
    contention = monitor.stop()
    write_result(args.out, {
        "streams": streams, "cpu_contention": vars(contention),
        "versions": package_versions("llama-cpp-python"),
        "settings": {"n_ctx": job["n_ctx"], "n_threads": job["threads"],
                     "n_threads_batch": job["threads"], "sampler": "greedy (temp 0)",
                     "timed": "Llama.generate: each token as yielded"}})
    return 0


if __name__ == "__main__":
    sys.exit(main())
