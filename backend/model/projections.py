"""A model's projection weights built from its state dict, plain, quantized at build
(``quantization="int8"`` or ``"int4"``) or from a GGUF file's own quantized blocks
(``"gguf"``).

A GGUF read for ``"gguf"`` (:mod:`backend.model.gguf_weights`) leaves each tensor of a type the
kernels take in the state dict as integer codes, under the tensor's own name, with its scales
(and zeros) next to it:

* 4-bit (Q4_0, Q4_1): ``name`` uint8 codes ``[out, in]`` in [0, 15], ``name + SCALE`` and
  ``name + ZERO`` float32 ``[out, in / 32]``: ``w = (q - 8) * scale + zero``;
* 8-bit (Q8_0): ``name`` int8 codes, ``name + SCALE`` float32 ``[out, in / 32]``:
  ``w = q * scale``.

A 4-bit projection becomes :class:`~kernels.quant_linear.Int4Weight` with the file's codes as
they are. An 8-bit one becomes :class:`~kernels.quant_linear.Int8Weight` with one scale per row,
re-derived from the file's values: torch has no kernel for int8 codes with a scale per block of
32, and a row's scale costs at most half a step of it (about 0.4% of the row's largest weight).
Tables that are read by lookup, not multiplied (the embeddings), are dequantized to the model's
dtype; float tensors of the file stay plain under ``"gguf"``.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import torch

from kernels.quant_linear import Weight, int4_weight, maybe_quantize, quantize

SCALE = "_scale"
ZERO = "_zero"
GGUF = "gguf"  # the quantization that takes the file's own blocks
GGUF_BLOCK = 32  # inputs per scale in Q4_0, Q4_1 and Q8_0

# A reordering of a weight's output rows (a fused projection's heads), applied alike to plain
# weights, codes, scales and zeros.
Rows = Callable[[torch.Tensor], torch.Tensor]


def _is_codes(weights: dict[str, torch.Tensor], name: str) -> bool:
    return name + SCALE in weights


def cast_weights(weights: dict[str, torch.Tensor], device: str, dtype: torch.dtype
                 ) -> dict[str, torch.Tensor]:
    """``weights`` on ``device``, the plain ones in ``dtype``; codes, scales and zeros keep
    theirs (they are rounded once, to the kernel's dtype, when packed)."""
    side = {name + suffix for name in weights if _is_codes(weights, name)
            for suffix in (SCALE, ZERO)}
    return {k: v.to(device) if k in side or not v.is_floating_point()
            else v.to(device=device, dtype=dtype) for k, v in weights.items()}


def dense(weights: dict[str, torch.Tensor], name: str, dtype: torch.dtype) -> torch.Tensor:
    """The values of ``name`` in ``dtype``: the tensor itself when plain, else its codes
    dequantized."""
    codes = weights[name]
    if not _is_codes(weights, name):
        return codes
    scales = weights[name + SCALE].repeat_interleave(GGUF_BLOCK, dim=1)
    if codes.dtype == torch.int8:
        return (codes.float() * scales).to(dtype)
    zeros = weights[name + ZERO].repeat_interleave(GGUF_BLOCK, dim=1)
    return ((codes.float() - 8) * scales + zeros).to(dtype)


def projection(weights: dict[str, torch.Tensor], names: Sequence[str], quantization: str | None,
               dtype: torch.dtype, rows: Rows | None = None) -> Weight:
    """The weight of the projection whose output rows are those of ``names`` in turn (q, k and
    v fused into one), its rows reordered by ``rows``.

    Where every part holds codes of the same width they are joined and packed as they are;
    otherwise the parts are joined plain and quantized as ``quantization`` asks (``"gguf"``
    leaves them plain).
    """
    def joined(parts: list[torch.Tensor]) -> torch.Tensor:
        whole = parts[0] if len(parts) == 1 else torch.cat(parts)
        return whole if rows is None else rows(whole)

    if all(_is_codes(weights, n) for n in names):
        widths = {weights[n].dtype for n in names}
        if widths == {torch.uint8}:
            return int4_weight(joined([weights[n] for n in names]),
                               joined([weights[n + SCALE] for n in names]),
                               joined([weights[n + ZERO] for n in names]), GGUF_BLOCK)
        if widths == {torch.int8}:
            return quantize(joined([dense(weights, n, torch.float32) for n in names]), "int8")
    plain = joined([dense(weights, n, dtype) for n in names])
    return maybe_quantize(plain, None if quantization == GGUF else quantization)
