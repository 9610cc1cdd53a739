"""Weight-only quantized projections on CPU: int8 per output channel, int4 per group of inputs.

The weights are stored quantized and multiplied by torch's packed CPU kernels
(``_weight_int8pack_mm``, ``_weight_int4pack_mm_for_cpu``); the activations stay in the model's
dtype outside the kernel. Both kernels run on bf16 activations: their fp32 and fp16 versions are
scalar loops, far slower on this project's AVX2 CPUs, so fp32 inputs are cast to bf16 for the
product and its result cast back. Scales (and int4 zeros) are therefore bf16
too, as the kernels require; they are rounded to bf16 before the weights are quantized against
them, so that the stored codes are the nearest to each weight under the scales the kernel uses.

* int8: symmetric, one scale per output row: ``w ≈ q * scale`` with ``q`` in [-127, 127].
* int4: asymmetric, one scale and zero per ``group_size`` inputs of a row, in the layout of
  torch's int4 kernels (tinygemm's): ``w ≈ (q - 8) * scale + zero`` with ``q`` in [0, 15]. The
  kernel needs the output rows in multiples of 16: other row counts are padded with zero rows,
  cut from the result.

:func:`quant_linear_reference` (dequantize, then an fp32 matmul) is the kernels' reference.
Weights in llama.cpp's block formats (a GGUF file's own, :mod:`kernels.block_quant`) go to their
kernel through :func:`quant_linear` too.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F

from kernels import block_quant
from kernels.block_quant import BlockWeight

QUANTIZATIONS = ("int8", "int4")
INT4_GROUP_SIZES = (32, 64)
# The group size ``quantize`` uses for int4: llama.cpp's Q4_0/Q4_1 block, the comparison of
# issue 15's acceptance.
DEFAULT_GROUP_SIZE = 32
# The kernels' activation, scale and zero dtype (see the module's docstring).
COMPUTE_DTYPE = torch.bfloat16
_INT4_ROWS = 16  # _convert_weight_to_int4pack_for_cpu packs output rows in blocks of 16


@dataclass(frozen=True)
class Int8Weight:
    """A ``[out, in]`` weight as int8 codes and one bf16 scale per output row."""

    codes: torch.Tensor  # int8 [out, in]
    scales: torch.Tensor  # bf16 [out]

    @property
    def shape(self) -> torch.Size:
        return self.codes.shape

    @property
    def device(self) -> torch.device:
        return self.codes.device


@dataclass(frozen=True)
class Int4Weight:
    """A ``[out, in]`` weight as 4-bit codes packed for the CPU kernel, with a bf16 scale and
    zero per group of ``group_size`` inputs of each row."""

    packed: torch.Tensor  # uint8, _convert_weight_to_int4pack_for_cpu's layout of [rows, in]
    scales_and_zeros: torch.Tensor  # bf16 [in / group_size, rows, 2]
    group_size: int
    out_features: int  # rows beyond it (up to a multiple of 16) are padding
    in_features: int

    @property
    def shape(self) -> torch.Size:
        return torch.Size((self.out_features, self.in_features))

    @property
    def device(self) -> torch.device:
        return self.packed.device


QuantizedWeight = Int8Weight | Int4Weight | BlockWeight
# What a projection of the model holds: a plain weight, or a quantized one.
Weight = torch.Tensor | QuantizedWeight


def quantize(weight: torch.Tensor, kind: str, group_size: int = DEFAULT_GROUP_SIZE
             ) -> QuantizedWeight:
    """``weight`` ``[out, in]`` quantized as ``kind`` (``"int8"`` or ``"int4"``); raises
    ``ValueError`` naming the shape when the kernel cannot take it."""
    if weight.dim() != 2 or weight.device.type != "cpu":
        raise ValueError(f"quantization takes a 2-D CPU weight, got {tuple(weight.shape)} on "
                         f"{weight.device}")
    if kind == "int8":
        return _quantize_int8(weight.float())
    if kind == "int4":
        return _quantize_int4(weight.float(), group_size)
    raise ValueError(f"quantization must be one of {', '.join(QUANTIZATIONS)}, got {kind!r}")


def maybe_quantize(weight: torch.Tensor, kind: str | None) -> Weight:
    """``weight`` quantized as ``kind``, or unchanged when ``kind`` is None."""
    return weight if kind is None else quantize(weight, kind)


def _quantize_int8(w: torch.Tensor) -> Int8Weight:
    scales = (w.abs().amax(dim=1) / 127).clamp(min=torch.finfo(torch.float32).tiny)
    scales = scales.to(COMPUTE_DTYPE)
    codes = torch.round(w / scales.float()[:, None]).clamp_(-127, 127).to(torch.int8)
    return Int8Weight(codes.contiguous(), scales.contiguous())


def _quantize_int4(w: torch.Tensor, group_size: int) -> Int4Weight:
    out_features, in_features = w.shape
    _check_int4_shape(out_features, in_features, group_size)
    groups = w.reshape(out_features, in_features // group_size, group_size)
    low, high = groups.amin(dim=2), groups.amax(dim=2)
    scales = ((high - low) / 15).clamp(min=torch.finfo(torch.float32).tiny).to(COMPUTE_DTYPE)
    # The zero is the value of code 8; code 0 stands for the group's minimum.
    zeros = (low + 8 * scales.float()).to(COMPUTE_DTYPE)
    codes = torch.round((groups - zeros.float()[..., None]) / scales.float()[..., None] + 8)
    codes = codes.clamp_(0, 15).reshape(out_features, in_features)
    return int4_weight(codes, scales, zeros, group_size)


def int4_weight(codes: torch.Tensor, scales: torch.Tensor, zeros: torch.Tensor,
                group_size: int) -> Int4Weight:
    """The kernel's weight for 4-bit ``codes`` ``[out, in]`` (integers in [0, 15], any dtype)
    with a scale and zero ``[out, in / group_size]`` per group: ``w = (q - 8) * scale + zero``.
    The codes are packed as they are; scales and zeros are rounded to bf16, the kernel's dtype.
    Raises ``ValueError`` naming the shape when the kernel cannot take it."""
    out_features, in_features = codes.shape
    _check_int4_shape(out_features, in_features, group_size)
    groups = (out_features, in_features // group_size)
    if scales.shape != groups or zeros.shape != groups:
        raise ValueError(f"int4 scales and zeros must be {groups} for {out_features}x"
                         f"{in_features} codes in groups of {group_size}, got "
                         f"{tuple(scales.shape)} and {tuple(zeros.shape)}")
    rows = -(-out_features // _INT4_ROWS) * _INT4_ROWS
    codes = codes.to(torch.int32)
    scales, zeros = scales.to(COMPUTE_DTYPE), zeros.to(COMPUTE_DTYPE)
    if rows != out_features:  # padding rows of weight 0: code 8, zero 0
        codes = torch.cat([codes, codes.new_full((rows - out_features, in_features), 8)])
        scales = torch.cat([scales, scales.new_zeros(rows - out_features, groups[1])])
        zeros = torch.cat([zeros, zeros.new_zeros(rows - out_features, groups[1])])
    packed = torch.ops.aten._convert_weight_to_int4pack_for_cpu(codes.contiguous(), 1)
    scales_and_zeros = torch.stack([scales, zeros], dim=-1).transpose(0, 1).contiguous()
    return Int4Weight(packed, scales_and_zeros, group_size, out_features, in_features)


def _check_int4_shape(out_features: int, in_features: int, group_size: int) -> None:
    if group_size not in INT4_GROUP_SIZES:
        raise ValueError(f"int4 group size must be one of {INT4_GROUP_SIZES}, got {group_size}")
    if in_features % group_size:
        raise ValueError(f"int4 quantization needs in_features to be a multiple of the group "
                         f"size {group_size}; the weight is {out_features}x{in_features}")


def quant_linear(x: torch.Tensor, weight: QuantizedWeight, bias: torch.Tensor | None = None
                 ) -> torch.Tensor:
    """``x @ w.T + bias`` for ``x`` ``[..., in]``, ``w`` the weight ``weight`` stands for; the
    result in ``x``'s dtype."""
    in_features = weight.shape[1]
    if x.shape[-1] != in_features:
        raise ValueError(f"input has {x.shape[-1]} features, the weight takes {in_features}")
    if isinstance(weight, BlockWeight):
        product = block_quant.block_linear(x, weight)
        return product if bias is None else product + bias
    # The kernels take 2-D inputs, contiguous along the features.
    flat = x.reshape(-1, in_features).to(COMPUTE_DTYPE).contiguous()
    if isinstance(weight, Int8Weight):
        out = torch.ops.aten._weight_int8pack_mm(flat, weight.codes, weight.scales)
    else:
        out = torch.ops.aten._weight_int4pack_mm_for_cpu(flat, weight.packed, weight.group_size,
                                                         weight.scales_and_zeros)
        if out.shape[1] != weight.out_features:
            # The padding rows cut, contiguous as a plain projection's result (the C kernels
            # that read it next take rows back to back).
            out = out[:, : weight.out_features].contiguous()
    out = out.to(x.dtype).reshape(*x.shape[:-1], weight.shape[0])
    return out if bias is None else out + bias


def dequantize(weight: QuantizedWeight) -> torch.Tensor:
    """The fp32 ``[out, in]`` weight that ``weight``'s codes and scales stand for."""
    if isinstance(weight, Int8Weight):
        return weight.codes.float() * weight.scales.float()[:, None]
    if isinstance(weight, BlockWeight):
        return block_quant.dequantize(weight)
    rows = weight.scales_and_zeros.shape[1]
    eye = torch.eye(weight.in_features, dtype=COMPUTE_DTYPE)
    # The packed layout is the kernel's own (blocks of rows, which torch may change): the codes
    # are read back through the kernel, multiplying the identity with unit scales and a zero of
    # 8, so that each product is one code, exact in bf16.
    unit = torch.zeros_like(weight.scales_and_zeros)
    unit[..., 0] = 1
    unit[..., 1] = 8
    codes = torch.ops.aten._weight_int4pack_mm_for_cpu(eye, weight.packed, weight.group_size,
                                                       unit).float().T
    scales_and_zeros = weight.scales_and_zeros.float().transpose(0, 1)  # [rows, groups, 2]
    groups = codes.reshape(rows, -1, weight.group_size)
    w = (groups - 8) * scales_and_zeros[..., :1] + scales_and_zeros[..., 1:]
    return w.reshape(rows, weight.in_features)[: weight.out_features]


def quant_linear_reference(x: torch.Tensor, weight: QuantizedWeight,
                           bias: torch.Tensor | None = None) -> torch.Tensor:
    """:func:`quant_linear` in plain torch: the weight dequantized, an fp32 matmul of the
    bf16-rounded input, the product rounded to bf16 as the kernels return it (for blocks,
    :func:`kernels.block_quant.block_linear_reference`)."""
    if isinstance(weight, BlockWeight):
        product = block_quant.block_linear_reference(x, weight).to(x.dtype)
        return product if bias is None else product + bias
    x32 = x.to(COMPUTE_DTYPE).float()
    out = F.linear(x32, dequantize(weight)).to(COMPUTE_DTYPE).to(x.dtype)
    return out if bias is None else out + bias
