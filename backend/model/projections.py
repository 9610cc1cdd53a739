"""A model's projection weights built from its state dict, plain, quantized at build into blocks
(``quantization="int8"`` or ``"int4"``, :mod:`pagedserve.kernels.quant_linear`) or from a GGUF
file's own quantized blocks (``"gguf"``).

A GGUF read for ``"gguf"`` (:mod:`pagedserve.model.gguf_weights`) leaves each tensor of a block
format the kernels take (Q4_1, and Q4_0 rewritten as Q4_1; Q8_0) in the state dict as its bytes,
uint8 ``[out, in / 32 * block bytes]``, under its name and, to say the format, also under
:func:`block_key` of its name and format (the same tensor: the key is the mark). A projection whose
parts are all blocks of one format becomes a :class:`~pagedserve.kernels.block_quant.BlockWeight` of
the file's bytes as they are (the rows of fused parts joined); otherwise its parts are dequantized
and joined plain. Tables that are read by lookup, not multiplied (the embeddings), are
dequantized to the model's dtype; float tensors of the file stay plain under ``"gguf"``.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import torch

from pagedserve.kernels.block_quant import FORMATS, BlockWeight, dequantize, pack_rows, quantize
from pagedserve.kernels.quant_linear import BLOCK_FORMATS, Weight, maybe_quantize

GGUF = "gguf"  # the quantization that takes the file's own blocks

# A reordering of a weight's output rows (a fused projection's heads), applied alike to plain
# weights and to rows of blocks.
Rows = Callable[[torch.Tensor], torch.Tensor]


def block_key(name: str, kind: str) -> str:
    """The key that marks tensor ``name`` of a state dict as blocks of format ``kind`` (no
    tensor name holds a colon)."""
    return f"{name}:{kind}"


def blocks_entries(name: str, kind: str, blocks: torch.Tensor) -> dict[str, torch.Tensor]:
    """State-dict entries of tensor ``name`` held as ``blocks`` of format ``kind``."""
    return {name: blocks, block_key(name, kind): blocks}


def as_blocks(weights: dict[str, torch.Tensor], kind_of: Callable[[str], str | None]
              ) -> dict[str, torch.Tensor]:
    """``weights`` with each 2-D tensor but the embeddings quantized to the block format
    ``kind_of(name)`` names (None: left plain), laid out as a GGUF read holds them: what
    ``quantization="gguf"`` serves, made from any model (tests, benchmarks)."""
    out: dict[str, torch.Tensor] = {}
    for name, tensor in weights.items():
        kind = None if tensor.dim() != 2 or "embed_tokens" in name else kind_of(name)
        if kind is None:
            out[name] = tensor
        else:
            out.update(blocks_entries(name, kind, quantize(tensor, kind).blocks))
    return out


def _block_kind(weights: dict[str, torch.Tensor], name: str) -> str | None:
    return next((kind for kind in FORMATS if block_key(name, kind) in weights), None)


def cast_weights(weights: dict[str, torch.Tensor], device: str, dtype: torch.dtype
                 ) -> dict[str, torch.Tensor]:
    """``weights`` on ``device``, the plain floating ones in ``dtype``; blocks stay bytes."""
    return {k: v.to(device=device, dtype=dtype) if v.is_floating_point() else v.to(device)
            for k, v in weights.items()}


def dense(weights: dict[str, torch.Tensor], name: str, dtype: torch.dtype) -> torch.Tensor:
    """The values of ``name`` in ``dtype``: the tensor itself when plain, else its blocks
    dequantized."""
    kind = _block_kind(weights, name)
    if kind is None:
        return weights[name]
    return dequantize(BlockWeight(kind, weights[name])).to(dtype)


def _joined(parts: list[torch.Tensor], rows: Rows | None) -> torch.Tensor:
    whole = parts[0] if len(parts) == 1 else torch.cat(parts)
    return whole if rows is None else rows(whole)


def joined_blocks(weights: dict[str, torch.Tensor], names: Sequence[str],
                  rows: Rows | None = None) -> BlockWeight | None:
    """The blocks of ``names`` with their rows joined in turn (reordered by ``rows``), where
    every part holds blocks of one format, Q4_1 repacked for the kernel
    (:func:`~pagedserve.kernels.block_quant.pack_rows`); else None."""
    kinds = {_block_kind(weights, n) for n in names}
    if len(kinds) != 1 or (kind := kinds.pop()) is None:
        return None
    return pack_rows(BlockWeight(kind, _joined([weights[n] for n in names], rows).contiguous()))


def projection(weights: dict[str, torch.Tensor], names: Sequence[str], quantization: str | None,
               dtype: torch.dtype, rows: Rows | None = None) -> Weight:
    """The weight of the projection whose output rows are those of ``names`` in turn (q, k and
    v fused into one), its rows reordered by ``rows``.

    Where every part holds blocks of one format they are joined as they are; otherwise the
    parts are joined plain and quantized as ``quantization`` asks (``"gguf"`` leaves them
    plain).
    """
    blocks = joined_blocks(weights, names, rows)
    if blocks is not None:
        return blocks
    plain = _joined([dense(weights, n, dtype) for n in names], rows)
    return maybe_quantize(plain, None if quantization == GGUF else quantization)


def block_projection(weights: dict[str, torch.Tensor], names: Sequence[str],
                     quantization: str | None, dtype: torch.dtype) -> BlockWeight | None:
    """The projection of ``names`` (their rows joined in turn) where it runs on blocks: the
    parts quantized at build, or a file's blocks of one format; else None."""
    if quantization in BLOCK_FORMATS:
        weight = projection(weights, names, quantization, dtype)
        assert isinstance(weight, BlockWeight)
        return weight
    return joined_blocks(weights, names)
