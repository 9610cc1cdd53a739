"""Weights in llama.cpp's block formats (Q4_1, Q8_0) and their products with fp32 activations.

A block holds 32 consecutive inputs of one output row: Q4_1 as an fp16 scale ``d``, an fp16
offset ``m`` and 4-bit codes (``w = d * q + m``), Q8_0 as an fp16 scale and int8 codes
(``w = d * q``). These are the bytes of a GGUF file's tensors, so a GGUF model's projections
serve from its own bytes; :func:`quantize` makes the same blocks from any float weight.
:func:`pack_rows` moves a weight's bytes into the kernel's faster layout (eight rows
interleaved, :data:`PACKED`); :func:`unpack_rows` moves them back.

The product (:func:`block_linear`) runs on the C kernel of ``kernels/csrc/block_quant_cpu.c``,
which quantizes the activations to 8 bits per block of 32 as llama.cpp does and multiplies
integers; :func:`block_linear_reference` is its reference: the same activation quantization in
torch, then exact integer sums. Where the C kernels are not built, :func:`block_linear` falls back
to the dequantized weight in an fp32 matmul (no activation quantization).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F

from pagedserve.kernels import cpu

BLOCK = 32
FORMATS = ("q4_1", "q8_0")  # a GGUF file's formats, as stored
# Each format with its rows repacked eight at a time for the kernel (kernels/csrc/block_quant_cpu.c
# documents the layouts): the same codes, scales and offsets, the same bytes in all.
PACKED = {"q4_1": "q4_1x8", "q8_0": "q8_0x8"}
_UNPACKED = {packed: kind for kind, packed in PACKED.items()}
_GROUP = 8  # rows repacked together


@dataclass(frozen=True)
class BlockWeight:
    """A ``[out, in]`` weight as ``out`` rows of ``in / 32`` blocks in format ``kind``."""

    kind: str  # one of FORMATS, or one of PACKED's values
    blocks: torch.Tensor  # uint8 [out, in / 32 * block bytes], contiguous

    @property
    def shape(self) -> torch.Size:
        rows, width = self.blocks.shape
        return torch.Size((rows, width // cpu.BLOCK_BYTES[self.kind] * BLOCK))

    @property
    def device(self) -> torch.device:
        return self.blocks.device


def _check_shape(kind: str, weight: torch.Tensor) -> None:
    if kind not in FORMATS:
        raise ValueError(f"unknown block format {kind!r}; known: {', '.join(FORMATS)}")
    if weight.dim() != 2 or weight.shape[1] % BLOCK:
        raise ValueError(f"{kind} needs a 2-D weight with inputs in blocks of {BLOCK}, got "
                         f"{tuple(weight.shape)}")


def _half_bytes(values: torch.Tensor) -> torch.Tensor:
    """fp16 values [..., 1] as their two bytes [..., 2] (little-endian, as GGUF stores them)."""
    return values.to(torch.float16).contiguous().view(torch.uint8)


def quantize(weight: torch.Tensor, kind: str) -> BlockWeight:
    """``weight`` ``[out, in]`` in the blocks of ``kind``, each code the nearest under the
    block's scale (and offset) as stored in fp16."""
    _check_shape(kind, weight)
    rows = weight.shape[0]
    w = weight.detach().float().reshape(rows, -1, BLOCK)
    if kind == "q4_1":
        low = w.amin(-1, keepdim=True)
        d = ((w.amax(-1, keepdim=True) - low) / 15).half()
        m = low.half()
        inv = torch.where(d.float() > 0, 1 / d.float(), torch.zeros_like(d, dtype=torch.float))
        q = torch.round((w - m.float()) * inv).clamp(0, 15).to(torch.uint8)
        codes = q[..., :BLOCK // 2] | (q[..., BLOCK // 2:] << 4)
        parts = [_half_bytes(d), _half_bytes(m), codes]
    else:
        d = (w.abs().amax(-1, keepdim=True) / 127).half()
        inv = torch.where(d.float() > 0, 1 / d.float(), torch.zeros_like(d, dtype=torch.float))
        q = torch.round(w * inv).clamp(-127, 127).to(torch.int8)
        parts = [_half_bytes(d), q.view(torch.uint8)]
    return BlockWeight(kind, torch.cat(parts, -1).reshape(rows, -1).contiguous())


def pack_rows(weight: BlockWeight) -> BlockWeight:
    """``weight`` with its rows repacked eight at a time (:data:`PACKED`), the faster layout of
    the kernel; ``weight`` itself where it is packed already or its rows are not a multiple of
    eight."""
    rows = weight.blocks.shape[0]
    if weight.kind not in PACKED or rows % _GROUP:
        return weight
    # [groups, blocks, row in group, block bytes]
    raw = weight.blocks.reshape(rows // _GROUP, _GROUP, -1,
                                cpu.BLOCK_BYTES[weight.kind]).transpose(1, 2)
    lead = raw.shape[:2]
    if weight.kind == "q4_1":
        halves, stored = raw[..., 0:4], raw[..., 4:]
        codes = torch.cat([stored & 0x0F, stored >> 4], -1)  # [g, b, row, 32 inputs]
    else:
        halves, codes = raw[..., 0:2], raw[..., 2:] ^ 0x80  # int8 codes stored plus 128
    # Vector j, byte 4 * row + t: the code of input 4j + t (j < 8).
    vectors = codes.reshape(*codes.shape[:3], 8, 4).permute(0, 1, 3, 2, 4).reshape(*lead, 8, 32)
    if weight.kind == "q4_1":
        vectors = vectors[:, :, :4] | (vectors[:, :, 4:] << 4)
    # Each row's fp16 scales (then its offsets) side by side, then the vectors.
    scales = halves.reshape(*lead, _GROUP, -1, 2).transpose(2, 3).reshape(*lead, -1)
    out = torch.cat([scales, vectors.reshape(*lead, -1)], -1)
    return BlockWeight(PACKED[weight.kind], out.reshape(rows, -1).contiguous())


def unpack_rows(weight: BlockWeight) -> BlockWeight:
    """The GGUF blocks of a packed ``weight`` (:func:`pack_rows` undone); ``weight`` itself when
    it is not packed."""
    kind = _UNPACKED.get(weight.kind)
    if kind is None:
        return weight
    rows = weight.blocks.shape[0]
    raw = weight.blocks.reshape(rows // _GROUP, -1, _GROUP * cpu.BLOCK_BYTES[kind])
    lead = raw.shape[:2]
    halves = 4 if kind == "q4_1" else 2  # fp16 bytes per row of a block
    scales = raw[..., :_GROUP * halves].reshape(*lead, halves // 2, _GROUP, 2).transpose(2, 3)
    vectors = raw[..., _GROUP * halves:].reshape(*lead, -1, 32)
    if kind == "q4_1":
        vectors = torch.cat([vectors & 0x0F, vectors >> 4], 2)  # [g, b, 8 vectors, 32 bytes]
    codes = vectors.reshape(*lead, 8, _GROUP, 4).permute(0, 1, 3, 2, 4).reshape(
        *lead, _GROUP, 32)
    stored = codes[..., :16] | (codes[..., 16:] << 4) if kind == "q4_1" else codes ^ 0x80
    blocks = torch.cat([scales.reshape(*lead, _GROUP, halves), stored], -1).transpose(1, 2)
    return BlockWeight(kind, blocks.reshape(rows, -1).contiguous())


def dequantize(weight: BlockWeight) -> torch.Tensor:
    """The fp32 ``[out, in]`` matrix the blocks stand for."""
    weight = unpack_rows(weight)
    rows = weight.blocks.shape[0]
    raw = weight.blocks.reshape(rows, -1, cpu.BLOCK_BYTES[weight.kind])
    d = raw[..., 0:2].contiguous().view(torch.float16).float()
    if weight.kind == "q4_1":
        m = raw[..., 2:4].contiguous().view(torch.float16).float()
        codes = raw[..., 4:]
        q = torch.cat([codes & 0x0F, codes >> 4], -1).float()
        w = d * q + m
    else:
        w = d * raw[..., 2:].contiguous().view(torch.int8).float()
    return w.reshape(rows, -1)


def quantize_activations(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """fp32 rows ``[rows, in]`` as int8 codes (as fp32 values) and one fp32 scale per block of
    32, as the kernel quantizes them: ``x ≈ scale * codes``."""
    blocks = x.float().reshape(x.shape[0], -1, BLOCK)
    amax = blocks.abs().amax(-1, keepdim=True)
    inv = torch.where(amax > 0, 127 / amax, torch.zeros_like(amax))
    return torch.round(blocks * inv), amax / 127


def block_linear_reference(x: torch.Tensor, weight: BlockWeight) -> torch.Tensor:
    """What the kernel computes, in float64: quantized activations times the blocks' codes,
    scaled per block pair (``x`` ``[rows, in]`` → ``[rows, out]``)."""
    weight = unpack_rows(weight)
    codes, scales = quantize_activations(x)
    rows = weight.blocks.shape[0]
    raw = weight.blocks.reshape(rows, -1, cpu.BLOCK_BYTES[weight.kind])
    d = raw[..., 0:2].contiguous().view(torch.float16).double()  # [out, blocks, 1]
    if weight.kind == "q4_1":
        m = raw[..., 2:4].contiguous().view(torch.float16).double()
        packed = raw[..., 4:]
        q = torch.cat([packed & 0x0F, packed >> 4], -1).double()
    else:
        m = torch.zeros_like(d)
        q = raw[..., 2:].contiguous().view(torch.int8).double()
    xq, xs = codes.double(), scales.double()  # [rows, blocks, 32], [rows, blocks, 1]
    products = torch.einsum("rbj,obj->rob", xq, q)  # integer sums, exact in float64
    sums = xq.sum(-1)  # [rows, blocks]
    out = (products * (d[..., 0] * xs[..., 0][:, None, :])).sum(-1) + \
        (m[..., 0][None] * (xs[..., 0] * sums)[:, None, :]).sum(-1)
    return out.float()


def silu_gated(x: torch.Tensor, gate_up: BlockWeight, gate_bias: torch.Tensor | None = None,
               up_bias: torch.Tensor | None = None) -> torch.Tensor:
    """``silu(x @ gate.T + gate_bias) * (x @ up.T + up_bias)`` for a SwiGLU MLP whose gate and
    up rows are fused into ``gate_up`` (the gate's first): one product, then the activation (in
    C where the kernels are built, as the fused decode layers compute it)."""
    both = block_linear(x, gate_up)
    width = both.shape[-1] // 2
    if both.device.type == "cpu" and both.dtype == torch.float32 and cpu.available():
        rows = both.reshape(-1, 2 * width)
        return cpu.silu_mul(rows, gate_bias, up_bias).reshape(*both.shape[:-1], width)
    gate, up = both[..., :width], both[..., width:]
    if gate_bias is not None:
        gate = gate + gate_bias
    if up_bias is not None:
        up = up + up_bias
    return F.silu(gate) * up


def block_linear(x: torch.Tensor, weight: BlockWeight) -> torch.Tensor:
    """``x @ w.T`` for ``x`` ``[..., in]`` of any float dtype; the result in ``x``'s dtype."""
    lead = x.shape[:-1]
    rows = x.reshape(-1, x.shape[-1])
    out_features = weight.blocks.shape[0]
    if rows.device.type == "cpu" and cpu.available():
        flat = rows.float()
        if flat.stride(1) != 1:
            flat = flat.contiguous()
        y = cpu.block_matmul(flat, weight.blocks, weight.kind, out_features)
    else:
        y = F.linear(rows.float(), dequantize(weight).to(rows.device))
    return y.to(x.dtype).reshape(*lead, out_features)
