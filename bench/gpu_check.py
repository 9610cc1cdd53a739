"""The GPU check of issue 11, one command: kernel tests, kernel benchmarks, engine vs transformers.

On a machine with a CUDA GPU (about five minutes on one data-centre GPU, nothing downloaded;
the models are random-weight Llamas built on the spot, the tokenizer is the embedded SmolLM2's)::

    python -m pagedserve.bench.gpu_check [--out bench/results/gpu_check.json]

1. runs ``tests/test_triton_kernels.py`` and ``tests/test_lora_kernels.py`` on the GPU;
2. measures the device-to-device copy bandwidth (``triton.testing.do_bench``, median) and times
   each Triton kernel against the torch path, reporting the bytes each must move divided by
   its time as a fraction of that bandwidth;
3. checks the engine's greedy tokens and beam search against ``transformers``' ``generate``
   on a tiny fp32 model, and times the engine against ``transformers``' batched ``generate``
   on a ~1B-shaped bf16 model (Llama 3.2 1B's shapes, SmolLM2's vocabulary);
4. prints one table (and writes it as JSON with ``--out``) and exits non-zero, naming them,
   when a check fails: a kernel test, an attention error past its bound, tokens that differ.

``--smoke`` runs every step on the CPU with the kernels interpreted and tiny shapes, in
seconds: it checks the script's code paths, not the GPU (``tests/test_bench_gpu_check.py``).
"""

from __future__ import annotations

import os
import sys

if "--smoke" in sys.argv:  # the interpreter is chosen when triton is first imported
    os.environ.setdefault("TRITON_INTERPRET", "1")

import argparse
import json
import random
import subprocess
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import torch
from transformers import AutoTokenizer, LlamaConfig, LlamaForCausalLM

from pagedserve import LLM, SamplingParams
from pagedserve.kernels import rotary
from pagedserve.kernels.attention import AttentionMetadata, paged_attention
from pagedserve.kernels.lora import add_lora
from pagedserve.kernels.norm import add_rms_norm
from pagedserve.model.loader import LoadedModel, resolve_model_dir

ROOT = Path(__file__).resolve().parent.parent
# Largest relative error of the bf16 Triton attention against the torch path: bf16's rounding,
# not a wrong key or mask.
ATTENTION_TOLERANCE = 1e-2


@dataclass
class Shapes:
    """Sizes of one run: the issue's on a GPU, tiny ones for ``--smoke``."""

    decode_seqs: int
    decode_context: int
    kv_heads: int
    heads: int
    head_dim: int
    block_size: int
    prefill_seqs: int
    prefill_len: int
    hidden: int
    copy_bytes: int
    engine_prompts: int
    prompt_len: int
    output_len: int
    hf_batch: int


GPU = Shapes(decode_seqs=64, decode_context=2048, kv_heads=8, heads=32, head_dim=128,
             block_size=16, prefill_seqs=4, prefill_len=2048, hidden=2048, copy_bytes=2**30,
             engine_prompts=256, prompt_len=128, output_len=128, hf_batch=64)
SMOKE = Shapes(decode_seqs=2, decode_context=40, kv_heads=2, heads=4, head_dim=64,
               block_size=16, prefill_seqs=1, prefill_len=20, hidden=64, copy_bytes=2**20,
               engine_prompts=2, prompt_len=6, output_len=3, hf_batch=2)


@dataclass
class Row:
    """One line of the table."""

    name: str
    triton_ms: float | None = None
    torch_ms: float | None = None
    bytes_moved: int | None = None
    fraction_of_copy: float | None = None
    note: str = ""
    passed: bool | None = None  # None: a measurement, not a check


class Timer:
    """Median milliseconds of a call: ``triton.testing.do_bench`` on a GPU, one timed call after
    a warm-up on the CPU (the interpreter is only exercised there, not measured)."""

    def __init__(self, device: torch.device) -> None:
        self.device = device

    def __call__(self, fn: Callable[[], Any]) -> float:
        if self.device.type == "cuda":
            from triton.testing import do_bench

            return float(do_bench(fn, warmup=25, rep=200, return_mode="median"))
        fn()
        start = time.perf_counter()
        fn()
        return (time.perf_counter() - start) * 1e3


def copy_bandwidth(shapes: Shapes, device: torch.device, timer: Timer) -> float:
    """Device-to-device copy rate in bytes/s (a read and a write per byte copied)."""
    src = torch.empty(shapes.copy_bytes, dtype=torch.uint8, device=device)
    dst = torch.empty_like(src)
    ms = timer(lambda: dst.copy_(src))
    return 2 * shapes.copy_bytes / (ms / 1e3)


def _paged_batch(shapes: Shapes, query_lens: list[int], seq_lens: list[int], dtype: torch.dtype,
                 device: torch.device) -> tuple[torch.Tensor, ...]:
    """q, K/V caches, shuffled block tables and the new tokens' slots for the given lengths."""
    bs = shapes.block_size
    per_seq = [-(-n // bs) for n in seq_lens]
    num_blocks = sum(per_seq) + 1
    order = torch.randperm(num_blocks - 1) + 1
    tables, start = [], 0
    for count in per_seq:
        tables.append(order[start: start + count].tolist())
        start += count
    width = max(per_seq)
    block_tables = torch.tensor([t + [0] * (width - len(t)) for t in tables], device=device)
    cache_shape = (num_blocks, bs, shapes.kv_heads, shapes.head_dim)
    k_cache = torch.randn(cache_shape, dtype=dtype, device=device)
    v_cache = torch.randn(cache_shape, dtype=dtype, device=device)
    q = torch.randn(sum(query_lens), shapes.heads, shapes.head_dim, dtype=dtype, device=device)
    slots = torch.tensor([t[p // bs] * bs + p % bs for t, n, length in
                          zip(tables, query_lens, seq_lens) for p in range(length - n, length)],
                         device=device)
    return q, k_cache, v_cache, block_tables, slots


def attention_row(name: str, shapes: Shapes, query_lens: list[int], seq_lens: list[int],
                  device: torch.device, timer: Timer, bandwidth: float) -> Row:
    dtype = torch.bfloat16
    q, k_cache, v_cache, tables, slots = _paged_batch(shapes, query_lens, seq_lens, dtype,
                                                      device)
    # Fresh prefills read their own keys from k/v, the rest from the cache.
    k = k_cache.view(-1, *k_cache.shape[2:])[slots]
    v = v_cache.view(-1, *v_cache.shape[2:])[slots]
    decodes = sum(1 for n in query_lens if n == 1)
    scale = shapes.head_dim ** -0.5

    def run(backend: str) -> Callable[[], Any]:
        def step() -> Any:
            # Metadata is built once per step and shared by the layers: timed with the call.
            meta = AttentionMetadata(slot_mapping=torch.zeros(0, dtype=torch.long,
                                                              device=device),
                                     block_tables=tables, query_lens=query_lens,
                                     seq_lens=seq_lens, num_decodes=decodes,
                                     block_size=shapes.block_size, backend=backend)
            return paged_attention(q, k, v, k_cache, v_cache, meta, scale)
        return step

    got, expected = run("triton")(), run("torch")()
    error = float((got.float() - expected.float()).abs().max() / expected.float().abs().max())
    context_bytes = sum(seq_lens) * 2 * shapes.kv_heads * shapes.head_dim * dtype.itemsize
    moved = context_bytes + 2 * q.numel() * dtype.itemsize
    triton_ms, torch_ms = timer(run("triton")), timer(run("torch"))
    return Row(name, triton_ms, torch_ms, moved, moved / (triton_ms / 1e3) / bandwidth,
               f"rel. error vs torch {error:.1e}", passed=error < ATTENTION_TOLERANCE)


def rotary_row(shapes: Shapes, device: torch.device, timer: Timer, bandwidth: float) -> Row:
    dtype = torch.bfloat16
    tokens = shapes.prefill_seqs * shapes.prefill_len
    width = (shapes.heads + 2 * shapes.kv_heads) * shapes.head_dim
    qkv = torch.randn(tokens, width, dtype=dtype, device=device)
    angles = torch.rand(tokens, shapes.head_dim // 2, device=device) * 100
    cos = torch.cat([angles.cos()] * 2, dim=-1).to(dtype)
    sin = torch.cat([angles.sin()] * 2, dim=-1).to(dtype)
    k_cache = torch.empty(tokens // shapes.block_size + 1, shapes.block_size, shapes.kv_heads,
                          shapes.head_dim, dtype=dtype, device=device)
    v_cache = torch.empty_like(k_cache)
    slots = torch.randperm(tokens, device=device)

    def run(backend: str) -> Callable[[], Any]:
        return lambda: rotary.rotary_write_kv(qkv, cos, sin, k_cache, v_cache, slots,
                                              shapes.heads, shapes.kv_heads, backend)

    # q|k read and written, v read, k and v written to the cache, cos/sin read.
    moved = tokens * dtype.itemsize * (2 * width + 2 * 2 * shapes.kv_heads * shapes.head_dim
                                       + 2 * shapes.head_dim)
    triton_ms, torch_ms = timer(run("triton")), timer(run("torch"))
    return Row("rotary + KV write", triton_ms, torch_ms, moved,
               moved / (triton_ms / 1e3) / bandwidth, f"{tokens} tokens")


def norm_row(shapes: Shapes, device: torch.device, timer: Timer, bandwidth: float) -> Row:
    dtype = torch.bfloat16
    tokens = shapes.prefill_seqs * shapes.prefill_len
    x = torch.randn(tokens, shapes.hidden, dtype=dtype, device=device)
    delta = torch.randn_like(x)
    weight = torch.randn(shapes.hidden, dtype=dtype, device=device)

    def run(backend: str) -> Callable[[], Any]:
        return lambda: add_rms_norm(x, delta, weight, 1e-5, backend)

    moved = 4 * x.numel() * dtype.itemsize  # x and delta read, the sum and the output written
    triton_ms, torch_ms = timer(run("triton")), timer(run("torch"))
    return Row("add + RMSNorm", triton_ms, torch_ms, moved,
               moved / (triton_ms / 1e3) / bandwidth, f"{tokens} x {shapes.hidden}")


def lora_row(shapes: Shapes, device: torch.device, timer: Timer, bandwidth: float) -> Row:
    """The multi-LoRA delta of a decode batch's q|k|v projection: 8 adapters of rank 16."""
    dtype, rank, slots_n = torch.bfloat16, 16, 8
    tokens = shapes.decode_seqs
    out_slices = (shapes.heads * shapes.head_dim, shapes.kv_heads * shapes.head_dim,
                  shapes.kv_heads * shapes.head_dim)
    x = torch.randn(tokens, shapes.hidden, dtype=dtype, device=device)
    y = torch.zeros(tokens, sum(out_slices), dtype=dtype, device=device)
    a = torch.randn(slots_n, 3 * rank, shapes.hidden, dtype=dtype, device=device) * 0.02
    b = torch.randn(slots_n, sum(out_slices), rank, dtype=dtype, device=device) * 0.02
    slots = torch.arange(tokens, device=device) % slots_n

    def run(backend: str, out: torch.Tensor = y) -> Callable[[], Any]:
        return lambda: add_lora(out, x, a, b, slots, out_slices, backend=backend)

    got, expected = y.clone(), y.clone()
    run("triton", got)()
    run("torch", expected)()
    error = float((got.float() - expected.float()).norm() / expected.float().norm())
    # Every adapter's a and b read once, x read, y read and written.
    moved = (a.numel() + b.numel() + x.numel() + 2 * y.numel()) * dtype.itemsize
    triton_ms, torch_ms = timer(run("triton")), timer(run("torch"))
    return Row("LoRA delta (q|k|v)", triton_ms, torch_ms, moved,
               moved / (triton_ms / 1e3) / bandwidth,
               f"{tokens} rows, {slots_n} adapters of rank {rank}; rel. error vs torch "
               f"{error:.1e}", passed=error < 1e-2)


def kernel_tests(smoke: bool) -> Row:
    command = [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider",
               str(ROOT / "tests" / "test_triton_kernels.py"),
               str(ROOT / "tests" / "test_lora_kernels.py")]
    if smoke:
        command += ["-k", "launch_config or triton_kernels_single_row"]
    run = subprocess.run(command, capture_output=True, text=True, cwd=ROOT)
    summary = (run.stdout.strip().splitlines() or ["no output"])[-1]
    return Row("kernel tests", note=("passed: " if run.returncode == 0 else "FAILED: ") + summary,
               passed=run.returncode == 0)


def _tokenizer() -> Any:
    return AutoTokenizer.from_pretrained(resolve_model_dir(None))


def _random_llama(config: LlamaConfig, dtype: torch.dtype, device: torch.device
                  ) -> LlamaForCausalLM:
    torch.manual_seed(0)
    with torch.device(device):
        model = LlamaForCausalLM(config)
    # transformers types PreTrainedModel.to through a decorator mypy misreads.
    return model.to(dtype).eval()  # type: ignore[arg-type]


def _llama_config(tokenizer: Any, **shape: Any) -> LlamaConfig:
    return LlamaConfig(vocab_size=len(tokenizer), max_position_embeddings=4096,
                       bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id,
                       pad_token_id=tokenizer.eos_token_id, **shape)


def _loaded(model: LlamaForCausalLM, tokenizer: Any) -> LoadedModel:
    return LoadedModel("random", model.config, tokenizer, dict(model.state_dict()))


def _prompts(count: int, length: int, vocab: int, seed: int) -> list[list[int]]:
    gen = random.Random(seed)
    return [[gen.randrange(3, vocab) for _ in range(length)] for _ in range(count)]


def _hf_generate(model: LlamaForCausalLM, prompts: list[list[int]], max_new: int,
                 batch_size: int) -> list[list[int]]:
    """Greedy batched ``generate`` (equal-length prompts: no padding), exactly ``max_new``
    tokens per prompt."""
    outs: list[list[int]] = []
    device = next(model.parameters()).device
    with torch.inference_mode():
        for start in range(0, len(prompts), batch_size):
            ids = torch.tensor(prompts[start: start + batch_size], device=device)
            out = model.generate(ids, attention_mask=torch.ones_like(ids), do_sample=False,
                                 max_new_tokens=max_new, min_new_tokens=max_new,
                                 pad_token_id=model.generation_config.pad_token_id)
            outs.extend(out[:, ids.shape[1]:].tolist())
    return outs


def _hf_beams(model: LlamaForCausalLM, prompt: list[int], width: int, max_new: int
              ) -> list[list[int]]:
    """transformers' ``width`` best beams of ``prompt``, each through its first EOS."""
    device = next(model.parameters()).device
    eos = model.generation_config.eos_token_id
    ids = torch.tensor([prompt], device=device)
    with torch.inference_mode():
        out = model.generate(ids, attention_mask=torch.ones_like(ids), do_sample=False,
                             num_beams=width, num_return_sequences=width,
                             max_new_tokens=max_new, pad_token_id=eos, eos_token_id=eos)
    beams = []
    for beam in out[:, len(prompt):].tolist():
        beams.append(beam[: beam.index(eos) + 1] if eos in beam else beam)
    return beams


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def engine_rows(shapes: Shapes, device: torch.device, smoke: bool) -> list[Row]:
    tokenizer = _tokenizer()
    backend = "triton"
    # Greedy tokens against transformers on a tiny fp32 model.
    tiny = _random_llama(_llama_config(tokenizer, hidden_size=64, intermediate_size=128,
                                       num_hidden_layers=2, num_attention_heads=4,
                                       num_key_value_heads=1, head_dim=16,
                                       initializer_range=0.15), torch.float32, device)
    prompts = _prompts(2 if smoke else 16, shapes.prompt_len, len(tokenizer), 1)
    reference = _hf_generate(tiny, prompts, shapes.output_len, len(prompts))
    llm = LLM(loaded=_loaded(tiny, tokenizer), device=str(device), dtype="float32",
              attention_backend=backend, kv_cache_bytes=64 * 2**20)
    params = SamplingParams(temperature=0.0, max_tokens=shapes.output_len, ignore_eos=True)
    got = [o.outputs[0].token_ids for o in llm.generate(prompt_token_ids=prompts,
                                                        sampling_params=params,
                                                        use_tqdm=False)]
    same = sum(a == b for a, b in zip(got, reference))
    rows = [Row("greedy = transformers (fp32)", note=f"{same}/{len(prompts)} prompts identical",
                passed=same == len(prompts))]
    # Beam search keeps its scores on the host while the logits come from the device.
    width = 3
    beams = SamplingParams(beam_width=width, n=width, max_tokens=shapes.output_len)
    got_beams = [[c.token_ids for c in o.outputs]
                 for o in llm.generate(prompt_token_ids=prompts, sampling_params=beams,
                                       use_tqdm=False)]
    same = sum(g == _hf_beams(tiny, p, width, shapes.output_len)
               for g, p in zip(got_beams, prompts))
    rows.append(Row("beam search = transformers (fp32)",
                    note=f"width {width}: {same}/{len(prompts)} prompts identical",
                    passed=same == len(prompts)))
    del llm, tiny

    # Throughput on a 1B-shaped bf16 model (tiny in smoke mode).
    if smoke:
        shape = dict(hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                     num_attention_heads=4, num_key_value_heads=2, head_dim=16)
    else:  # Llama 3.2 1B
        shape = dict(hidden_size=2048, intermediate_size=8192, num_hidden_layers=16,
                     num_attention_heads=32, num_key_value_heads=8, head_dim=64)
    model = _random_llama(_llama_config(tokenizer, **shape), torch.bfloat16, device)
    prompts = _prompts(shapes.engine_prompts, shapes.prompt_len, len(tokenizer), 2)
    generated = shapes.engine_prompts * shapes.output_len
    _hf_generate(model, prompts[: shapes.hf_batch], 2, shapes.hf_batch)  # warm-up
    _sync(device)
    start = time.perf_counter()
    _hf_generate(model, prompts, shapes.output_len, shapes.hf_batch)
    _sync(device)
    hf_s = time.perf_counter() - start
    engine_args: dict[str, Any] = dict(device=str(device), dtype="bfloat16",
                                       attention_backend=backend,
                                       max_num_seqs=shapes.engine_prompts)
    if smoke:
        engine_args["kv_cache_bytes"] = 16 * 2**20
    llm = LLM(loaded=_loaded(model, tokenizer), **engine_args)
    # Warm-up: every kernel compiled (prefill and decode shapes) before the timed run.
    llm.generate(prompt_token_ids=prompts[:1], use_tqdm=False,
                 sampling_params=SamplingParams(temperature=0.0, max_tokens=2))
    llm.reset_prefix_cache()
    _sync(device)
    start = time.perf_counter()
    llm.generate(prompt_token_ids=prompts, sampling_params=params, use_tqdm=False)
    _sync(device)
    engine_s = time.perf_counter() - start
    rows.append(Row("engine vs transformers (bf16)", engine_s * 1e3, hf_s * 1e3,
                    note=f"{generated / engine_s:.0f} vs {generated / hf_s:.0f} tok/s: "
                         f"{hf_s / engine_s:.2f}x"))
    return rows


def _fmt(value: float | None, spec: str) -> str:
    return "" if value is None else format(value, spec)


def print_table(device: str, bandwidth: float, rows: list[Row]) -> None:
    print(f"device: {device}; device-to-device copy {bandwidth / 1e9:.1f} GB/s")
    header = f"{'check':<32}{'triton ms':>11}{'torch ms':>11}{'speedup':>9}{'of copy BW':>12}  note"
    print(header)
    print("-" * len(header))
    for r in rows:
        speedup = r.torch_ms / r.triton_ms if r.triton_ms and r.torch_ms else None
        print(f"{r.name:<32}{_fmt(r.triton_ms, '11.3f')}{_fmt(r.torch_ms, '11.3f')}"
              f"{_fmt(speedup, '9.2f')}{_fmt(r.fraction_of_copy, '12.1%')}  {r.note}")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m pagedserve.bench.gpu_check",
                                     description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--smoke", action="store_true",
                        help="CPU, interpreted kernels, tiny shapes: the code paths only")
    parser.add_argument("--out", type=Path, default=None, help="also write the table as JSON")
    args = parser.parse_args(argv)
    if not args.smoke and not torch.cuda.is_available():
        print("no CUDA device: run on a GPU machine, or pass --smoke", file=sys.stderr)
        return 2
    device = torch.device("cpu" if args.smoke else "cuda")
    shapes = SMOKE if args.smoke else GPU
    timer = Timer(device)
    torch.manual_seed(0)
    rows = [kernel_tests(args.smoke)]
    bandwidth = copy_bandwidth(shapes, device, timer)
    decode_lens = [shapes.decode_context] * shapes.decode_seqs
    rows.append(attention_row(
        f"decode {shapes.decode_seqs} x {shapes.decode_context}", shapes,
        [1] * shapes.decode_seqs, decode_lens, device, timer, bandwidth))
    rows.append(attention_row(
        f"prefill {shapes.prefill_seqs} x {shapes.prefill_len}", shapes,
        [shapes.prefill_len] * shapes.prefill_seqs, [shapes.prefill_len] * shapes.prefill_seqs,
        device, timer, bandwidth))
    rows.append(rotary_row(shapes, device, timer, bandwidth))
    rows.append(norm_row(shapes, device, timer, bandwidth))
    rows.append(lora_row(shapes, device, timer, bandwidth))
    rows.extend(engine_rows(shapes, device, args.smoke))
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu (interpreted)"
    print_table(name, bandwidth, rows)
    failed = [r.name for r in rows if r.passed is False]
    if failed:
        print(f"FAILED: {'; '.join(failed)}", file=sys.stderr)
    if args.out is not None:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(json.dumps({
            "device": name, "smoke": args.smoke, "copy_bandwidth_bytes_per_s": bandwidth,
            "torch": torch.__version__, "shapes": asdict(shapes),
            "rows": [asdict(r) for r in rows]}, indent=2) + "\n")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
