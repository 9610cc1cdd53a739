"""The block-quantized products, the GGUF layout against the packed one, in the same run.

Each of the embedded model's projections (its Q4_1 layers and its Q8_0 output projection) is
timed at 1, 8, 32 and 256 rows of activations through ``kernels.cpu.block_matmul``, once on the
file's own layout (``q4_1``, ``q8_0``) and once on the same bytes repacked eight rows at a time
(``q4_1x8``, ``q8_0x8``: VNNI's dpbusd where the host has it). Each figure is the best of
several repetitions; the ratio is plain over packed time.

Usage (from the repository root)::

    python -m pagedserve.bench.block_kernels [--quick] [--out FILE]
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import torch

from pagedserve.bench.host import host_isa
from pagedserve.kernels import block_quant, cpu

# SmolLM2-135M's products: name, output rows, inputs, format.
SHAPES = (("qkv", 960, 576, "q4_1"), ("o", 576, 576, "q4_1"), ("gate_up", 3072, 576, "q4_1"),
          ("down", 576, 1536, "q4_1"), ("output", 49152, 576, "q8_0"))
ROWS = (1, 8, 32, 256)
# Multiply-adds timed per repetition, so that small products repeat enough to time.
WORK_PER_REP = 100_000_000


def best_time(x: torch.Tensor, weight: block_quant.BlockWeight, reps: int, calls: int) -> float:
    """The best of ``reps`` timings of ``calls`` products, per product, in seconds."""
    out_features = weight.shape[0]
    best = float("inf")
    for _ in range(reps):
        start = time.perf_counter()
        for _ in range(calls):
            cpu.block_matmul(x, weight.blocks, weight.kind, out_features)
        best = min(best, (time.perf_counter() - start) / calls)
    return best


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n", 1)[0])
    parser.add_argument("--quick", action="store_true", help="two shapes, 1 and 8 rows")
    parser.add_argument("--out", type=Path, default=Path("bench/results/block_kernels.json"))
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    if not cpu.available():
        print("the C kernels are not built on this machine: nothing to time")
        return 1
    isa = host_isa()
    shapes = (SHAPES[0], SHAPES[-1]) if args.quick else SHAPES
    rows_list = ROWS[:2] if args.quick else ROWS
    reps = 2 if args.quick else 7
    generator = torch.Generator().manual_seed(0)
    results = []
    print(f"host: {torch.get_num_threads()} threads; ISA: {', '.join(isa) or 'none of note'}")
    print(f"{'product':>8} {'rows':>5} {'plain ms':>9} {'packed ms':>10} {'plain/packed':>13}")
    for name, out_features, in_features, kind in shapes:
        plain = block_quant.quantize(torch.randn(out_features, in_features,
                                                 generator=generator), kind)
        packed = block_quant.pack_rows(plain)
        for rows in rows_list:
            x = torch.randn(rows, in_features, generator=generator)
            calls = 1 if args.quick else max(1, WORK_PER_REP // (rows * out_features *
                                                                  in_features))
            best_time(x, packed, 1, 1)  # warm: the weight in cache as later calls find it
            plain_s = best_time(x, plain, reps, calls)
            packed_s = best_time(x, packed, reps, calls)
            results.append({"product": name, "kind": kind, "packed_kind": packed.kind,
                            "rows": rows, "out": out_features, "in": in_features,
                            "plain_s": plain_s, "packed_s": packed_s,
                            "ratio": plain_s / packed_s})
            print(f"{name:>8} {rows:>5} {plain_s * 1e3:>9.3f} {packed_s * 1e3:>10.3f} "
                  f"{plain_s / packed_s:>12.2f}x")
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps({"time": time.time(), "quick": args.quick, "isa": isa,
                                    "threads": torch.get_num_threads(), "rows": results},
                                   indent=1))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
