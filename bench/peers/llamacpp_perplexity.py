"""Perplexity of a text under llama.cpp (``llama-cpp-python``): the model's scores at every
position of the text's token ids, evaluated in one pass.

Job: ``model`` (a GGUF file), ``token_ids`` (the text, tokenized by our tokenizer: the GGUF
holds the same vocabulary), ``threads``. Result: ``perplexity`` = exp of the mean negative
log-probability of each token after those before it, as ``pagedserve.bench.quantization`` computes
ours.
"""

from __future__ import annotations

import math
import sys
from typing import Any

from .jobs import package_versions, parse_args, read_job, write_result

FIELDS = {"model": str, "token_ids": list, "threads": int}


def perplexity(scores: Any, token_ids: list[int]) -> float:
    """exp(mean(-log softmax(scores[i])[token_ids[i + 1]])) over the text's positions;
    ``scores`` a numpy array [tokens, vocab]."""
    import numpy as np

    rows = scores[:-1].astype(np.float64)
    top = rows.max(axis=1, keepdims=True)
    log_norm = top[:, 0] + np.log(np.exp(rows - top).sum(axis=1))
    chosen = rows[np.arange(len(rows)), token_ids[1:]]
    return math.exp(float((log_norm - chosen).mean()))


def main(argv: list[str] | None = None) -> int:
    args = parse_args(__doc__.split("\n", 1)[0], argv)
    job = read_job(args.job, FIELDS)
    token_ids = job["token_ids"]
    from llama_cpp import Llama

    llm = Llama(model_path=job["model"], n_ctx=len(token_ids) + 8, n_threads=job["threads"],
                n_threads_batch=job["threads"], logits_all=True, seed=0, verbose=False)
    llm.eval(token_ids)
    write_result(args.out, {"perplexity": perplexity(llm.scores[: len(token_ids)], token_ids),
                            "versions": package_versions("llama_cpp_python")})
    return 0


if __name__ == "__main__":
    sys.exit(main())
