"""Weight-only quantization on the default model: how close to fp32, how fast.

Settings: ``fp32`` (the GGUF's Q4_1 weights dequantized: the file's values), ``int8`` and
``int4`` (re-quantized from those), ``gguf`` (the file's own blocks, as
``pagedserve.model.gguf_weights`` serves them) and ``gguf-fp32-head`` (the same, the tied output
projection left as the file's dequantized Q8_0 values, to weigh that choice). Per setting:

* greedy agreement with fp32: each token chosen after fp32's own prefix (the model's
  decisions), and free-running (one different token changes all that follow);
* perplexity of ``tests.prompts.LONG_PROMPT`` (and llama.cpp's on the same GGUF file, where
  ``pagedserve.bench.peer_venvs`` has built its venv);
* one-stream decode tok/s: one short prompt, ``--tokens`` greedy tokens (EOS ignored), run
  ``--runs`` times; the prefill (timed alone) is subtracted.

For the quantized settings also the block format their projections hold and, for int8 and int4
(quantized again at load), their distance from the file's values:
``|W_kernel - W_file| / |W_file|`` over all projections.

The machine may be shared: decode speeds are printed per run, with the load average, and torch
runs ``--threads`` threads (1 by default: on a busy machine its threads' barriers wait on each
other's descheduled peers, which hides the kernels' differences).

Usage (from the repository root)::

    python -m pagedserve.bench.quantization [--tokens 128] [--runs 2] [--prompts 12]
                                            [--agreement 32] [--threads 1]
                                            [--settings fp32,int4,gguf]
"""

from __future__ import annotations

import argparse
import os
import time

import torch
import torch.nn.functional as F

from pagedserve import LLM, SamplingParams
from pagedserve.bench import peer_venvs
from pagedserve.kernels.block_quant import BlockWeight, dequantize
from pagedserve.model.loader import LoadedModel, default_model_path, load_model
from tests.prompts import LONG_PROMPT, PROMPTS

SETTINGS = ("fp32", "int8", "int4", "gguf", "gguf-fp32-head", "gguf-fp16-kv", "fp32-fp16-kv")
# A setting's suffix -> its KV cache dtype (the others keep the model's, fp32).
KV_SUFFIX = "-fp16-kv"


def logits_of(llm: LLM, token_ids: list[int]) -> torch.Tensor:
    """The model's scores at every position of ``token_ids``, prefilled in one step."""
    model = llm.engine.model
    hidden: list[torch.Tensor] = []
    forward = type(model).forward

    def capture(*args: object, **kwargs: object) -> torch.Tensor:
        hidden.append(forward(model, *args, **kwargs))  # type: ignore[arg-type]
        return hidden[-1]

    model.forward = capture  # type: ignore[method-assign]
    try:
        llm.generate(prompt_token_ids=[token_ids], use_tqdm=False,
                     sampling_params=SamplingParams(temperature=0.0, max_tokens=1))
    finally:
        del model.forward
    return model.logits(torch.cat(hidden))


def build(setting: str, plain: LoadedModel, blocks: LoadedModel) -> LLM:
    kind = setting.removesuffix("-fp32-head").removesuffix(KV_SUFFIX)
    # fp32 named: "auto" is bf16 on hosts with bf16 arithmetic.
    llm = LLM(loaded=blocks if kind == "gguf" else plain, kv_cache_bytes=64 << 20,
              dtype="float32", enable_prefix_caching=False,
              quantization=None if kind == "fp32" else kind,
              kv_cache_dtype="float16" if setting.endswith(KV_SUFFIX) else "auto")
    if setting == "gguf-fp32-head":  # tied: the embeddings hold the file's Q8_0 values
        model = llm.engine.model
        model.lm_head = model.embed  # type: ignore[attr-defined]
    return llm


def _format(weight: object) -> str:
    return weight.kind if isinstance(weight, BlockWeight) else "plain"


def weight_report(llm: LLM, plain: LoadedModel, setting: str) -> str:
    """The block formats of the model's projections and output projection and, where they were
    quantized at build (int8, int4), their distance from the file's values,
    ``|W_kernel - W_file| / |W_file|`` over all the layers' projections."""
    names = {"qkv": ["self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj"],
             "o_proj": ["self_attn.o_proj"], "mlp_in": ["mlp.gate_proj", "mlp.up_proj"],
             "down": ["mlp.down_proj"]}
    model = llm.engine.model
    layers = model.layers  # type: ignore[attr-defined]
    report = f"projections {_format(layers[0].qkv)}, output {_format(model.lm_head)}"
    if setting not in ("int8", "int4"):
        return report
    diff = total = 0.0
    for i, layer in enumerate(layers):
        for attr, parts in names.items():
            exact = torch.cat([plain.weights[f"model.layers.{i}.{p}.weight"] for p in parts])
            diff += float((dequantize(getattr(layer, attr)) - exact).square().sum())
            total += float(exact.square().sum())
    return f"{report}; weights vs the file's {(diff / total) ** 0.5:.2e}"


def decode_speed(llm: LLM, prompt: list[int], tokens: int) -> float:
    def timed(n: int) -> float:
        params = SamplingParams(temperature=0.0, max_tokens=n, ignore_eos=True)
        start = time.perf_counter()
        llm.generate(prompt_token_ids=[prompt], sampling_params=params, use_tqdm=False)
        return time.perf_counter() - start

    prefill = timed(1)
    return (tokens - 1) / (timed(tokens) - prefill)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--tokens", type=int, default=128)
    parser.add_argument("--runs", type=int, default=2)
    parser.add_argument("--prompts", type=int, default=12)
    parser.add_argument("--agreement", type=int, default=32, help="tokens per prompt")
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--settings", default=",".join(SETTINGS), help="fp32 first")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    plain, blocks = load_model(), load_model(quantization="gguf")
    tok = plain.tokenizer
    prompts = [tok.encode(p) for p in PROMPTS[: args.prompts]]
    text = tok.encode(LONG_PROMPT)
    reference: list[list[int]] = []
    fp32_ppl = 0.0
    print(f"threads {torch.get_num_threads()}, load average {os.getloadavg()}, "
          f"{len(prompts)} prompts x {args.agreement} tokens, perplexity over {len(text)} tokens")
    for setting in args.settings.split(","):
        llm = build(setting, plain, blocks)
        outputs = llm.generate(prompt_token_ids=prompts, use_tqdm=False,
                               sampling_params=SamplingParams(temperature=0.0,
                                                              max_tokens=args.agreement,
                                                              ignore_eos=True))
        got = [o.outputs[0].token_ids for o in outputs]
        ppl = float(torch.exp(F.cross_entropy(logits_of(llm, text)[:-1],
                                              torch.tensor(text[1:]))))
        if setting == "fp32":
            reference, fp32_ppl = got, ppl
        total = sum(len(t) for t in reference)
        forced = sum(
            a == b for p, t in zip(prompts, reference)
            for a, b in zip(logits_of(llm, p + t[:-1])[len(p) - 1:].argmax(-1).tolist(), t))
        free = sum(a == b for g, t in zip(got, reference) for a, b in zip(g, t))
        speeds = [decode_speed(llm, prompts[1], args.tokens) for _ in range(args.runs)]
        extra = "" if setting.startswith("fp32") else f"; {weight_report(llm, plain, setting)}"
        print(f"{setting:>15}: agreement {forced / total:.3f} after fp32's prefix, "
              f"{free / total:.3f} free-running; perplexity {ppl:.3f} "
              f"({ppl / fp32_ppl - 1:+.2%} vs fp32); decode tok/s "
              f"{', '.join(f'{s:.1f}' for s in speeds)}{extra}", flush=True)
        del llm
    print(f"{'llama.cpp Q4_1':>15}: {llamacpp_perplexity(text, args.threads, fp32_ppl)}")


def llamacpp_perplexity(text: list[int], threads: int, fp32_ppl: float) -> str:
    """llama.cpp's perplexity of ``text`` on the same GGUF file, in its venv
    (``pagedserve.bench.peer_venvs``), as a line of the report."""
    problem = peer_venvs.peer_problem("llamacpp")
    if problem is not None:
        return f"not measured ({problem})"
    try:
        result = peer_venvs.run_peer("llamacpp", "llamacpp_perplexity", {
            "model": default_model_path(), "token_ids": text, "threads": threads})
    except peer_venvs.PeerError as e:
        return f"failed: {e}"
    ppl = result["perplexity"]
    versions = ", ".join(f"{k} {v}" for k, v in result["versions"].items())
    return f"perplexity {ppl:.3f} ({ppl / fp32_ppl - 1:+.2%} vs our fp32; {versions})"


if __name__ == "__main__":
    main()
