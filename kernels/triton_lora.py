"""The LoRA deltas of a mixed batch in the Triton language: the GPU path behind ``add_lora``.

Two kernels, as vLLM's punica ones: the shrink writes each row's ``tmp = a[slot] @ x[row]``
(fp32, ``parts * rank`` values) with one program per (row, block of ``a`` rows, split of
``in``), the splits added atomically when there are several (few rows would leave the GPU idle
otherwise); the expand adds ``b[slot, part columns] @ tmp[part block]`` into ``y`` with one
program per (row, part, block of the part's columns), rounding each element of ``y`` once. Rows
whose slot is negative do nothing in either. kernels/lora.py holds the definition.

Imported through :mod:`pagedserve.kernels.dispatch` only, which sets ``TRITON_INTERPRET=1`` first on
CPUs.
"""

from __future__ import annotations

import functools

import torch
import triton
import triton.language as tl

from pagedserve.kernels.dispatch import on_device, to_device


@triton.jit
def _shrink_kernel(
    x_ptr, a_ptr, slots_ptr, tmp_ptr, stride_x, stride_a, IN, PR, NUM_SLOTS, k_per_split,
    BLOCK_J: tl.constexpr, BLOCK_K: tl.constexpr, ATOMIC: tl.constexpr,
):
    row = tl.program_id(0).to(tl.int64)
    slot = tl.load(slots_ptr + row)
    if (slot >= 0) & (slot < NUM_SLOTS):
        j = tl.program_id(1) * BLOCK_J + tl.arange(0, BLOCK_J)
        j_ok = j < PR
        k_start = tl.program_id(2) * k_per_split
        acc = tl.zeros((BLOCK_J,), dtype=tl.float32)
        a_rows = a_ptr + slot * stride_a + j[:, None].to(tl.int64) * IN
        for k0 in range(k_start, k_start + k_per_split, BLOCK_K):
            k = k0 + tl.arange(0, BLOCK_K)
            k_ok = k < IN
            xv = tl.load(x_ptr + row * stride_x + k, mask=k_ok, other=0.0).to(tl.float32)
            av = tl.load(a_rows + k[None, :], mask=j_ok[:, None] & k_ok[None, :],
                         other=0.0).to(tl.float32)
            acc += tl.sum(av * xv[None, :], axis=1)
        out = tmp_ptr + row * PR + j
        if ATOMIC:
            tl.atomic_add(out, acc, mask=j_ok)
        else:
            tl.store(out, acc, mask=j_ok)


@triton.jit
def _expand_kernel(
    y_ptr, b_ptr, slots_ptr, tmp_ptr, parts_ptr, stride_y, stride_b, RANK, PR, NUM_SLOTS,
    NUM_PARTS, BLOCK_N: tl.constexpr, BLOCK_R: tl.constexpr,
):
    row = tl.program_id(0).to(tl.int64)
    part = tl.program_id(1)
    slot = tl.load(slots_ptr + row)
    # parts_ptr: the parts' first columns, then their widths.
    width = tl.load(parts_ptr + NUM_PARTS + part)
    n0 = tl.program_id(2) * BLOCK_N
    if (slot >= 0) & (slot < NUM_SLOTS) & (n0 < width):
        r = tl.arange(0, BLOCK_R)
        r_ok = r < RANK
        v = tl.load(tmp_ptr + row * PR + part * RANK + r, mask=r_ok, other=0.0)
        n = n0 + tl.arange(0, BLOCK_N)
        n_ok = n < width
        cols = tl.load(parts_ptr + part) + n
        bv = tl.load(b_ptr + slot * stride_b + cols[:, None] * RANK + r[None, :],
                     mask=n_ok[:, None] & r_ok[None, :], other=0.0).to(tl.float32)
        delta = tl.sum(bv * v[None, :], axis=1)
        y = y_ptr + row * stride_y + cols
        old = tl.load(y, mask=n_ok, other=0.0).to(tl.float32)
        tl.store(y, (old + delta).to(y_ptr.dtype.element_ty), mask=n_ok)


@functools.cache
def _part_table(out_slices: tuple[int, ...], device: torch.device) -> torch.Tensor:
    """The parts' first columns then their widths, on ``device`` (kept: launches stay free of
    host copies, CUDA graphs included)."""
    starts = [sum(out_slices[:p]) for p in range(len(out_slices))]
    return to_device(starts + list(out_slices), torch.int64, device)


def add_lora(y: torch.Tensor, x: torch.Tensor, a: torch.Tensor, b: torch.Tensor,
             slots: torch.Tensor, out_slices: tuple[int, ...], split_k: int | None = None
             ) -> None:
    """``y[t] += (x[t] @ a[s].T) @ b[s].T`` per part of ``out_slices``, in place, for every row
    ``t`` with ``s = slots[t] >= 0`` (shapes as kernels/lora.py gives them; ``y`` and ``x`` with
    contiguous columns). ``split_k`` fixes how many programs share a row's shrink over ``in``
    (by default: enough to give the GPU some hundreds of programs). Slots are not checked
    against the adapters here (that would wait for the device): one beyond them adds nothing."""
    parts = len(out_slices)
    if y.dim() != 2 or x.dim() != 2 or a.dim() != 3 or b.dim() != 3 \
            or x.shape[0] != y.shape[0] or sum(out_slices) != y.shape[1] \
            or min(out_slices, default=0) < 0 or b.shape[:2] != (a.shape[0], y.shape[1]) \
            or a.shape[1:] != (parts * b.shape[2], x.shape[1]) or slots.shape != y.shape[:1]:
        raise ValueError(f"shapes do not agree: y {tuple(y.shape)}, x {tuple(x.shape)}, "
                         f"a {tuple(a.shape)}, b {tuple(b.shape)}, slots {tuple(slots.shape)}, "
                         f"out_slices {out_slices}")
    if y.stride(1) != 1 or x.stride(1) != 1:
        raise ValueError("y and x must have contiguous columns")
    rows, in_features = x.shape
    rank = b.shape[2]
    pr = parts * rank
    if rows == 0 or pr == 0 or y.shape[1] == 0:
        return
    a, b, slots = a.contiguous(), b.contiguous(), slots.contiguous()
    block_j = min(64, triton.next_power_of_2(pr))
    block_k = min(128, triton.next_power_of_2(max(in_features, 1)))
    j_blocks = triton.cdiv(pr, block_j)
    k_blocks = triton.cdiv(in_features, block_k)
    if split_k is None:
        split_k = max(1, min(k_blocks, 256 // (rows * j_blocks)))
    k_per_split = triton.cdiv(k_blocks, max(1, min(split_k, k_blocks))) * block_k
    split_k = triton.cdiv(in_features, k_per_split)
    atomic = split_k > 1
    alloc = torch.zeros if atomic else torch.empty
    tmp = alloc(rows, pr, dtype=torch.float32, device=x.device)
    table = _part_table(tuple(out_slices), y.device)
    block_n = min(64, triton.next_power_of_2(max(max(out_slices), 1)))
    block_r = triton.next_power_of_2(rank)
    with on_device(y):
        _shrink_kernel[(rows, j_blocks, split_k)](
            x, a, slots, tmp, x.stride(0), a.stride(0), in_features, pr, a.shape[0], k_per_split,
            BLOCK_J=block_j, BLOCK_K=block_k, ATOMIC=atomic)
        _expand_kernel[(rows, parts, triton.cdiv(max(out_slices), block_n))](
            y, b, slots, tmp, table, y.stride(0), b.stride(0), rank, pr, a.shape[0], parts,
            BLOCK_N=block_n, BLOCK_R=block_r)
