"""Decode attention over an fp32 KV cache against fp16 and bf16 ones (``kv_cache_dtype``), in
the same run.

A decode step's attention for the embedded model's shape (9 query heads over 3 KV heads of 64,
blocks of 16 tokens) at 32 sequences, through ``kernels.cpu.decode_attention``, once per layer
over caches of its own (30 layers: the step reads them from memory, not from the last call's
cache lines), fp32 queries over each cache dtype. Each figure is the best of several
repetitions; the ratio is the fp32 cache's time over the narrow one's.

Usage (from the repository root)::

    python -m pagedserve.bench.kv_cache [--quick] [--out FILE]
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import torch

from pagedserve.bench.host import host_isa
from pagedserve.kernels import cpu

SEQS, BLOCK, KV_HEADS, HEADS, HEAD_DIM, LAYERS = 32, 16, 3, 9, 64, 30
CONTEXTS = (128, 512, 1024)
CACHE_DTYPES = {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}


def step_time(context: int, dtype: torch.dtype, layers: int, reps: int) -> float:
    """The best of ``reps`` timings of one step's attention over ``layers`` caches, seconds."""
    generator = torch.Generator().manual_seed(context)
    per_seq = -(-context // BLOCK)
    blocks = SEQS * per_seq + 1
    tables = torch.arange(1, blocks).view(SEQS, per_seq)
    lens = torch.full((SEQS,), context, dtype=torch.long)
    q = torch.randn(SEQS, HEADS, HEAD_DIM, generator=generator)
    out = torch.empty_like(q)
    shape = (blocks, BLOCK, KV_HEADS, HEAD_DIM)
    caches = [(torch.randn(shape, generator=generator).to(dtype),
               torch.randn(shape, generator=generator).to(dtype)) for _ in range(layers)]
    best = float("inf")
    for _ in range(reps):
        start = time.perf_counter()
        for k, v in caches:
            cpu.decode_attention(q, k, v, tables, lens, HEAD_DIM ** -0.5, out)
        best = min(best, time.perf_counter() - start)
    return best


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n", 1)[0])
    parser.add_argument("--quick", action="store_true", help="one short context, two layers")
    parser.add_argument("--out", type=Path, default=Path("bench/results/kv_cache.json"))
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    if not cpu.available():
        print("the C kernels are not built on this machine: nothing to time")
        return 1
    isa = host_isa()
    contexts = CONTEXTS[:1] if args.quick else CONTEXTS
    layers, reps = (2, 2) if args.quick else (LAYERS, 5)
    print(f"host: {torch.get_num_threads()} threads; ISA: {', '.join(isa) or 'none of note'}")
    print(f"{SEQS} sequences, {layers} layers, fp32 queries; ms per step, fp32 cache / this one")
    results = []
    for context in contexts:
        times = {name: step_time(context, dtype, layers, reps)
                 for name, dtype in CACHE_DTYPES.items()}
        cells = []
        for name, seconds in times.items():
            ratio = times["fp32"] / seconds
            results.append({"context": context, "cache": name, "layers": layers,
                            "step_s": seconds, "ratio": ratio,
                            "bytes": 2 * layers * SEQS * context * KV_HEADS * HEAD_DIM
                            * CACHE_DTYPES[name].itemsize})
            cells.append(f"{name} {seconds * 1e3:7.2f} ms ({ratio:.2f}x)")
        print(f"context {context:>5}: " + ", ".join(cells))
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps({"time": time.time(), "quick": args.quick, "isa": isa,
                                    "threads": torch.get_num_threads(), "rows": results},
                                   indent=1))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
