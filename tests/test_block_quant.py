"""The block-quantized products (kernels/block_quant.py, kernels/csrc/block_quant_cpu.c): GGUF's
byte layout, the C kernel against its float64 reference, and batch invariance."""

from __future__ import annotations

import ctypes
import subprocess
from pathlib import Path

import gguf
import numpy as np
import pytest
import torch

from pagedserve.kernels import block_quant, cpu

GGUF_TYPES = {"q4_1": gguf.GGMLQuantizationType.Q4_1, "q8_0": gguf.GGMLQuantizationType.Q8_0}

needs_kernels = pytest.mark.skipif(not cpu.available(), reason="no C compiler for the kernels")


def _gguf_blocks(weight: torch.Tensor, kind: str) -> block_quant.BlockWeight:
    raw = gguf.quants.quantize(weight.numpy(), GGUF_TYPES[kind])
    return block_quant.BlockWeight(kind, torch.from_numpy(np.ascontiguousarray(raw)))


@pytest.mark.parametrize("kind", block_quant.FORMATS)
def test_blocks_are_gguf_blocks(kind: str) -> None:
    """gguf's own quantizer and dequantizer agree with ours on every byte's meaning."""
    weight = torch.randn(48, 160, generator=torch.Generator().manual_seed(0)) * 0.05
    theirs = _gguf_blocks(weight, kind)
    assert theirs.shape == weight.shape
    expected = gguf.quants.dequantize(theirs.blocks.numpy(), GGUF_TYPES[kind])
    assert torch.equal(block_quant.dequantize(theirs), torch.from_numpy(expected))
    ours = block_quant.quantize(weight, kind)
    assert ours.blocks.shape == theirs.blocks.shape
    # Codes chosen against the fp16-rounded scales: never farther from the weight than gguf's.
    ours_error = (block_quant.dequantize(ours) - weight).abs()
    theirs_error = (block_quant.dequantize(theirs) - weight).abs()
    assert (ours_error <= theirs_error + 1e-6).all()
    assert (ours_error.norm() / weight.norm()) < (0.09 if kind == "q4_1" else 0.006)


# The kernel's formats: the file's, and each with its rows repacked eight at a time.
PACKED_FORMATS = list(block_quant.PACKED.values())
KERNEL_FORMATS = [*block_quant.FORMATS, *PACKED_FORMATS]
_UNPACKED = {packed: kind for kind, packed in block_quant.PACKED.items()}


def _blocks(weight: torch.Tensor, kind: str) -> block_quant.BlockWeight:
    if kind in _UNPACKED:
        return block_quant.pack_rows(block_quant.quantize(weight, _UNPACKED[kind]))
    return block_quant.quantize(weight, kind)


@pytest.mark.parametrize("kind", block_quant.FORMATS)
def test_repacked_rows_are_the_same_blocks(kind: str) -> None:
    """Packing rows eight at a time moves bytes only: unpacked, they are the blocks again, and
    they stand for the same matrix; packed weights and other row counts stay as they are."""
    weight = block_quant.quantize(torch.randn(24, 96, generator=torch.Generator().manual_seed(2)),
                                  kind)
    packed = block_quant.pack_rows(weight)
    assert packed.kind == block_quant.PACKED[kind] and packed.shape == weight.shape
    assert packed.blocks.shape == weight.blocks.shape
    assert not torch.equal(packed.blocks, weight.blocks)
    assert torch.equal(block_quant.unpack_rows(packed).blocks, weight.blocks)
    assert torch.equal(block_quant.dequantize(packed), block_quant.dequantize(weight))
    odd = block_quant.quantize(torch.randn(12, 64), kind)
    assert block_quant.pack_rows(odd) is odd and block_quant.pack_rows(packed) is packed


@needs_kernels
@pytest.mark.parametrize("kind", KERNEL_FORMATS)
@pytest.mark.parametrize("rows", [1, 3, 4, 9, 300])  # 300: the packed kernels' chunks of rows
def test_kernel_matches_reference(kind: str, rows: int) -> None:
    generator = torch.Generator().manual_seed(rows)
    weight = _blocks(torch.randn(40, 224, generator=generator), kind)
    x = torch.randn(rows, 224, generator=generator)
    x[0, :32] = 0  # an all-zero block has scale 0
    y = block_quant.block_linear(x, weight)
    reference = block_quant.block_linear_reference(x, weight)
    assert y.dtype == torch.float32 and y.shape == (rows, 40)
    torch.testing.assert_close(y, reference, rtol=1e-5, atol=1e-5 * reference.abs().max().item())
    # The activations' 8-bit blocks cost about half a percent against the dequantized weight.
    exact = x @ block_quant.dequantize(weight).T
    assert (y - exact).norm() / exact.norm() < 0.01


@needs_kernels
@pytest.mark.parametrize("kind", KERNEL_FORMATS)
def test_a_row_is_computed_alike_in_any_batch(kind: str) -> None:
    generator = torch.Generator().manual_seed(1)
    # 33 rows: the single-row path's groups of four and one left over; packed rows go by 8.
    out_features = 40 if kind in _UNPACKED else 33
    weight = _blocks(torch.randn(out_features, 96, generator=generator), kind)
    # 260 rows: the packed kernels take x in chunks of 256 rows.
    x = torch.randn(260, 96, generator=generator)
    batched = block_quant.block_linear(x, weight)
    for i in (0, 1, 5, 10, 255, 256, 259):
        assert torch.equal(block_quant.block_linear(x[i:i + 1], weight), batched[i:i + 1])
    assert torch.equal(block_quant.block_linear(x[:11], weight), batched[:11])


def _block_kernels(tmp_path: Path, name: str, *flags: str) -> ctypes.CDLL:
    """block_quant_cpu.c alone, built as kernels/cpu.py builds it plus ``flags``."""
    library = tmp_path / f"{name}.so"
    subprocess.run([cpu.compiler(), *cpu.COMMON_FLAGS, *cpu.SOURCE_FLAGS["block_quant_cpu.c"],
                    *flags, "-I", str(cpu.CSRC), str(cpu.CSRC / "block_quant_cpu.c"),
                    "-shared", "-o", str(library), "-lm"], check=True)
    lib = ctypes.CDLL(str(library))
    for fn in (lib.quantize_rows_q8, lib.matmul_q4_1x8, lib.matmul_q8_0x8):
        fn.restype = None
    return lib


def _packed_product(lib: ctypes.CDLL, x: torch.Tensor, weight: block_quant.BlockWeight
                    ) -> torch.Tensor:
    rows, k = x.shape
    n = weight.shape[0]
    q8 = torch.empty(rows * (k // 32) * 44, dtype=torch.uint8)
    lib.quantize_rows_q8(ctypes.c_void_p(x.data_ptr()), ctypes.c_int64(k),
                         ctypes.c_void_p(q8.data_ptr()), ctypes.c_int64(rows), ctypes.c_int64(k),
                         ctypes.c_int(2))
    y = torch.empty(rows, n)
    getattr(lib, f"matmul_{weight.kind}")(
        ctypes.c_void_p(q8.data_ptr()), ctypes.c_int64(rows), ctypes.c_void_p(
            weight.blocks.data_ptr()), ctypes.c_int64(n), ctypes.c_int64(k),
        ctypes.c_void_p(y.data_ptr()), ctypes.c_int64(n), ctypes.c_int(2))
    return y


@needs_kernels
def test_vnni_and_avx2_give_the_same_products(tmp_path: Path) -> None:
    """The packed kernels' integer sums are exact whichever instructions make them, so the
    host's build (VNNI where it has it) and one without VNNI give the same bits; the build
    without AVX2 (scalar loops, another fp32 order) agrees to rounding. On a host without
    VNNI the first two builds are the same code."""
    native = _block_kernels(tmp_path, "native")
    no_vnni = _block_kernels(tmp_path, "no-vnni", "-mno-avx512vnni", "-mno-avxvnni")
    scalar = _block_kernels(tmp_path, "scalar", "-mno-avx2")
    generator = torch.Generator().manual_seed(3)
    x = torch.randn(37, 192, generator=generator)
    for kind in block_quant.FORMATS:
        weight = block_quant.pack_rows(block_quant.quantize(
            torch.randn(48, 192, generator=generator), kind))
        y = _packed_product(native, x, weight)
        assert torch.equal(y, block_quant.block_linear(x, weight))
        assert torch.equal(y, _packed_product(no_vnni, x, weight))
        torch.testing.assert_close(_packed_product(scalar, x, weight), y, rtol=1e-5, atol=1e-4)


def test_leading_dimensions_and_dtype_are_kept() -> None:
    weight = block_quant.quantize(torch.randn(8, 64), "q4_1")
    x = torch.randn(2, 3, 64, dtype=torch.bfloat16)
    y = block_quant.block_linear(x, weight)
    assert y.shape == (2, 3, 8) and y.dtype == torch.bfloat16


def test_bad_shapes_are_refused() -> None:
    with pytest.raises(ValueError, match="blocks of 32"):
        block_quant.quantize(torch.randn(8, 48), "q4_1")
    with pytest.raises(ValueError, match="unknown block format"):
        block_quant.quantize(torch.randn(8, 64), "q5_k")
    if cpu.available():
        weight = block_quant.quantize(torch.randn(8, 64), "q8_0")
        with pytest.raises(ValueError, match="do not hold"):
            cpu.block_matmul(torch.randn(2, 96), weight.blocks, "q8_0", 8)
        twelve = block_quant.quantize(torch.randn(12, 64), "q4_1")
        with pytest.raises(ValueError, match="do not hold"):  # packed rows come by eight
            cpu.block_matmul(torch.randn(2, 64), twelve.blocks, block_quant.PACKED["q4_1"], 12)
