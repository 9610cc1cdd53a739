"""Weight-only quantization on CPU, made as a model is built: int8 as Q8_0 blocks, int4 as Q4_1.

Both are llama.cpp's block formats (:mod:`pagedserve.kernels.block_quant`), one scale (and, for
Q4_1, one offset) per 32 inputs of a row, and run on the same C kernels as a GGUF file's own blocks
(``quantization="gguf"``), which quantize the activations to 8 bits per block of 32 and
multiply integers:

* int8: Q8_0, symmetric: ``w ≈ d * q`` with ``q`` in [-127, 127] and an fp16 ``d`` per block.
* int4: Q4_1, asymmetric: ``w ≈ d * q + m`` with ``q`` in [0, 15] and fp16 ``d``, ``m`` per
  block; its rows repacked eight at a time for the kernel where they allow it.

torch's packed weight-only kernels (``_weight_int8pack_mm``, ``_weight_int4pack_mm_for_cpu``)
served these settings before; on this project's AVX2 CPUs they run on bf16 activations only and
decoded at well under half of the block kernels' speed (``docs/benchmarks.md``).
"""

from __future__ import annotations

import torch

from pagedserve.kernels import block_quant
from pagedserve.kernels.block_quant import BLOCK, BlockWeight, pack_rows

# Each build-time quantization and the block format it makes.
BLOCK_FORMATS = {"int8": "q8_0", "int4": "q4_1"}
QUANTIZATIONS = tuple(BLOCK_FORMATS)
# What a projection of the model holds: a plain weight, or one in blocks.
Weight = torch.Tensor | BlockWeight


def quantize(weight: torch.Tensor, kind: str) -> BlockWeight:
    """``weight`` ``[out, in]`` quantized as ``kind`` (``"int8"`` or ``"int4"``) into blocks laid
    out for the kernel; raises ``ValueError`` naming the shape when the kernel cannot take it."""
    if kind not in BLOCK_FORMATS:
        raise ValueError(f"quantization must be one of {', '.join(QUANTIZATIONS)}, got {kind!r}")
    if weight.dim() != 2 or weight.device.type != "cpu":
        raise ValueError(f"quantization takes a 2-D CPU weight, got {tuple(weight.shape)} on "
                         f"{weight.device}")
    out_features, in_features = weight.shape
    if in_features % BLOCK:
        raise ValueError(f"{kind} quantization needs in_features to be a multiple of the block "
                         f"size {BLOCK}; the weight is {out_features}x{in_features}")
    return pack_rows(block_quant.quantize(weight, BLOCK_FORMATS[kind]))


def maybe_quantize(weight: torch.Tensor, kind: str | None) -> Weight:
    """``weight`` quantized as ``kind``, or unchanged when ``kind`` is None."""
    return weight if kind is None else quantize(weight, kind)


def quant_linear(x: torch.Tensor, weight: BlockWeight, bias: torch.Tensor | None = None
                 ) -> torch.Tensor:
    """``x @ w.T + bias`` for ``x`` ``[..., in]``, ``w`` the weight ``weight`` stands for; the
    result in ``x``'s dtype."""
    in_features = weight.shape[1]
    if x.shape[-1] != in_features:
        raise ValueError(f"input has {x.shape[-1]} features, the weight takes {in_features}")
    product = block_quant.block_linear(x, weight)
    return product if bias is None else product + bias
