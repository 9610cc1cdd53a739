"""The LoRA kernels against ``add_lora_reference`` (pagedserve.kernels.lora): the C kernel
(kernels/csrc/lora_cpu.c) over shapes that reach its every path, the Triton kernels
(kernels/triton_lora.py) on CUDA or in Triton's interpreter on small shapes, and the choice
``add_lora`` makes between them.

Rows without an adapter (slot -1) must come back bit for bit as they were.
"""

from __future__ import annotations

from collections.abc import Callable
from types import ModuleType
from typing import Any

import pytest
import torch

from pagedserve.kernels import cpu, dispatch, lora

DEVICE = torch.device("cuda" if torch.cuda.is_available() else "cpu")
CPU = torch.device("cpu")
DTYPES = [torch.float32, torch.bfloat16, torch.float16]
# (rtol, atol). The reference rounds the delta to the dtype, then the sum; the kernels round
# the sum once. fp32: the sums in another order.
TOLERANCE = {torch.float32: (1e-5, 1e-5), torch.bfloat16: (1.6e-2, 1e-2),
             torch.float16: (2e-3, 2e-3)}
needs_c = pytest.mark.skipif(not cpu.available(), reason="no C compiler on this machine")

Case = tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]


def make_case(rows: int, in_features: int, out_slices: tuple[int, ...], rank: int,
              num_slots: int, dtype: torch.dtype, seed: int = 0,
              device: torch.device = CPU) -> Case:
    """y, x, a, b, slots of a random batch (deltas of about unit size). With more than two
    rows, the first has no adapter and the last the highest slot."""
    gen = torch.Generator().manual_seed(seed)
    parts = len(out_slices)
    x = torch.randn(rows, in_features, generator=gen)
    a = torch.randn(num_slots, parts * rank, in_features, generator=gen) / in_features ** 0.5
    b = torch.randn(num_slots, sum(out_slices), rank, generator=gen) / rank ** 0.5
    y = torch.randn(rows, sum(out_slices), generator=gen)
    slots = torch.randint(-1, num_slots, (rows,), generator=gen)
    if rows > 2:
        slots[0], slots[-1] = -1, num_slots - 1
    return (y.to(device, dtype), x.to(device, dtype), a.to(device, dtype), b.to(device, dtype),
            slots.to(device))


def check(got: torch.Tensor, before: torch.Tensor, expected: torch.Tensor,
          slots: torch.Tensor) -> None:
    rtol, atol = TOLERANCE[got.dtype]
    torch.testing.assert_close(got.float(), expected.float(), rtol=rtol, atol=atol)
    assert torch.equal(got[slots < 0], before[slots < 0])


def reference(case: Case, out_slices: tuple[int, ...]) -> torch.Tensor:
    y, x, a, b, slots = case
    expected = y.clone()
    lora.add_lora_reference(expected, x, a, b, slots, out_slices)
    return expected


# (rows, in, out_slices, rank, slots): a single decode row; q|k|v of a small model, rank 16
# (the kernel's fixed-rank tile transposes); uneven widths and `in` (partial column tiles),
# rank 11 (the general transpose, an odd rank for the single-row sum); a prefill with blocks of
# 16 rows and remainders, gate|up at rank 32; four parts at rank 64; rank 8, one adapter.
SHAPES = [
    (1, 64, (32,), 8, 1),
    (24, 96, (64, 32, 32), 16, 4),
    (37, 100, (50, 20, 33), 11, 3),
    (150, 130, (70, 64), 32, 2),
    (9, 48, (64, 16, 16, 48), 64, 8),
    (64, 40, (96,), 8, 1),
]


@needs_c
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("shape", SHAPES, ids=lambda s: "x".join(map(str, s[:2])) + f"r{s[3]}")
def test_cpu_kernel_matches_reference(shape: tuple[Any, ...], dtype: torch.dtype) -> None:
    rows, in_features, out_slices, rank, num_slots = shape
    case = make_case(rows, in_features, out_slices, rank, num_slots, dtype)
    expected = reference(case, out_slices)
    y, x, a, b, slots = case
    got = y.clone()
    cpu.add_lora(got, x, a, b, slots, out_slices)
    check(got, y, expected, slots)


@needs_c
@pytest.mark.parametrize("dtype", DTYPES)
def test_cpu_kernel_rounds_once(dtype: torch.dtype) -> None:
    """y[t] + delta rounded once to y's dtype, as torch rounds, over every bf16/fp16 value
    (infinities, NaNs, subnormals, overflow): integer inputs make the deltas exact whatever
    the order of the sums."""
    gen = torch.Generator().manual_seed(8)
    if dtype == torch.float32:
        y = torch.randn(64, 1024, generator=gen) * 1e3
    else:
        y = torch.arange(-2 ** 15, 2 ** 15, dtype=torch.int32).to(torch.int16)
        y = y.view(dtype).reshape(64, 1024).clone()
    x = torch.randint(-3, 4, (64, 8), generator=gen).to(dtype)
    a = torch.randint(-3, 4, (1, 8, 8), generator=gen).to(dtype)
    b = (torch.randint(-4, 5, (1, 1024, 4), generator=gen) / 64).to(dtype)
    slots = torch.zeros(64, dtype=torch.int64)
    delta = torch.cat([(x.float() @ a[0, :4].float().T) @ b[0, :512].float().T,
                       (x.float() @ a[0, 4:].float().T) @ b[0, 512:].float().T], dim=1)
    expected = (y.float() + delta).to(dtype)
    got = y.clone()
    cpu.add_lora(got, x, a, b, slots, (512, 512))
    assert torch.equal(got.isnan(), expected.isnan())
    numbers = ~expected.isnan()
    assert torch.equal(got[numbers], expected[numbers])


@needs_c
def test_cpu_kernel_same_bits_on_any_thread_count() -> None:
    """Each output element is one thread's sum in a fixed order: the threads change nothing."""
    out_slices = (96, 32, 32)
    y, x, a, b, slots = make_case(80, 160, out_slices, 16, 5, torch.float32, seed=3)
    results = []
    threads = torch.get_num_threads()
    try:
        for n in (1, 2, 3):
            torch.set_num_threads(n)
            got = y.clone()
            cpu.add_lora(got, x, a, b, slots, out_slices)
            results.append(got)
    finally:
        torch.set_num_threads(threads)
    assert torch.equal(results[0], results[1]) and torch.equal(results[0], results[2])


@needs_c
def test_cpu_kernel_rows_apart() -> None:
    """y and x may be column ranges of wider rows: only y's own columns change."""
    out_slices = (40, 24)
    y, x, a, b, slots = make_case(12, 72, out_slices, 8, 3, torch.bfloat16, seed=1)
    wide_y = torch.randn(12, 100).to(torch.bfloat16)
    wide_x = torch.zeros(12, 90).to(torch.bfloat16)
    wide_y[:, 20:84] = y
    wide_x[:, 10:82] = x
    before = wide_y.clone()
    cpu.add_lora(wide_y[:, 20:84], wide_x[:, 10:82], a, b, slots, out_slices)
    check(wide_y[:, 20:84], y, reference((y, x, a, b, slots), out_slices), slots)
    assert torch.equal(wide_y[:, :20], before[:, :20])
    assert torch.equal(wide_y[:, 84:], before[:, 84:])


@needs_c
def test_cpu_kernel_edges() -> None:
    """No adapter in the batch, no rows, and a slot beyond the adapters (refused, y intact)."""
    y, x, a, b, slots = make_case(6, 32, (16, 16), 4, 2, torch.float32)
    got = y.clone()
    cpu.add_lora(got, x, a, b, torch.full((6,), -1), (16, 16))
    assert torch.equal(got, y)
    cpu.add_lora(y[:0], x[:0], a, b, slots[:0], (16, 16))
    with pytest.raises(ValueError, match="outside the 2 adapters"):
        cpu.add_lora(got, x, a, b, torch.tensor([0, 1, 2, 0, 1, -1]), (16, 16))
    assert torch.equal(got, y)
    with pytest.raises(ValueError, match="shapes do not agree"):
        cpu.add_lora(got, x, a, b, slots, (16, 8))


@pytest.fixture(scope="module")
def triton_lora() -> ModuleType:
    return dispatch.triton_module("triton_lora", DEVICE)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("split_k", [None, 1, 3])
def test_triton_kernels_match_reference(triton_lora: ModuleType, dtype: torch.dtype,
                                        split_k: int | None) -> None:
    """Shrink (in one program or split over `in`, added atomically: two blocks of `in` here)
    and expand, rows without an adapter skipped; small shapes for the interpreter."""
    out_slices = (24, 8, 16)
    case = make_case(5, 200, out_slices, 8, 3, dtype, seed=2, device=DEVICE)
    expected = reference(case, out_slices)
    y, x, a, b, slots = case
    got = y.clone()
    triton_lora.add_lora(got, x, a, b, slots, out_slices, split_k=split_k)
    check(got, y, expected, slots)


def test_triton_kernels_single_row_and_wide_part(triton_lora: ModuleType) -> None:
    """T = 1, a part wider than one block of columns (several column programs), a rank that
    is no power of two."""
    out_slices = (150, 20)
    case = make_case(1, 40, out_slices, 6, 1, torch.float32, seed=4, device=DEVICE)
    case[4].fill_(0)
    expected = reference(case, out_slices)
    y, x, a, b, slots = case
    got = y.clone()
    triton_lora.add_lora(got, x, a, b, slots, out_slices)
    check(got, y, expected, slots)


def _spy(monkeypatch: pytest.MonkeyPatch, module: Any, name: str) -> list[int]:
    """Counts the calls of ``module.name``, which still runs."""
    calls: list[int] = []
    real: Callable[..., Any] = getattr(module, name)

    def counted(*args: Any, **kwargs: Any) -> Any:
        calls.append(1)
        return real(*args, **kwargs)

    monkeypatch.setattr(module, name, counted)
    return calls


@pytest.mark.parametrize("backend", ["torch", "cpu", "auto"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_add_lora_backends(backend: str, dtype: torch.dtype,
                           monkeypatch: pytest.MonkeyPatch) -> None:
    """Each backend gives the reference's result; "cpu" and "auto" take the C kernel on CPU
    tensors when it is built, "torch" never does."""
    if backend == "cpu" and not cpu.available():
        pytest.skip("no C compiler on this machine")
    out_slices = (48, 16, 16)
    case = make_case(10, 64, out_slices, 8, 4, dtype, seed=5)
    expected = reference(case, out_slices)
    calls = _spy(monkeypatch, cpu, "add_lora")
    y, x, a, b, slots = case
    got = y.clone()
    lora.add_lora(got, x, a, b, slots, out_slices, backend=backend)
    check(got, y, expected, slots)
    assert len(calls) == (backend != "torch" and cpu.available())


@needs_c
def test_add_lora_makes_inputs_fit(monkeypatch: pytest.MonkeyPatch) -> None:
    """Strided y (written back), x, a and b and int32 slots go through the C kernel; mixed
    dtypes fall back to the reference."""
    out_slices = (32, 16)
    y, x, a, b, slots = make_case(7, 24, out_slices, 4, 2, torch.float32, seed=6)
    expected = reference((y, x, a, b, slots), out_slices)
    calls = _spy(monkeypatch, cpu, "add_lora")
    got = y.t().contiguous().t()  # columns apart
    lora.add_lora(got, x.t().contiguous().t(), a.transpose(1, 2).contiguous().transpose(1, 2),
                  b.transpose(0, 1).contiguous().transpose(0, 1), slots.int(), out_slices,
                  backend="cpu")
    assert len(calls) == 1
    check(got, y, expected, slots)

    mixed = y.clone()
    lora.add_lora(mixed, x, a.double(), b, slots, out_slices, backend="cpu")
    assert len(calls) == 1
    torch.testing.assert_close(mixed, expected)


def test_add_lora_triton_backend() -> None:
    """``backend="triton"`` runs the Triton kernels (interpreted on a CPU), strided y written
    back."""
    out_slices = (16, 8)
    case = make_case(4, 32, out_slices, 4, 2, torch.float32, seed=7, device=DEVICE)
    expected = reference(case, out_slices)
    y, x, a, b, slots = case
    got = y.t().contiguous().t()
    lora.add_lora(got, x, a, b, slots.int(), out_slices, backend="triton")
    check(got, y, expected, slots)
