"""LoRA deltas of a mixed batch: each row adds the low-rank product of its own adapter.

A projection ``y = x @ W.T`` served with adapters adds, for every row ``t`` whose adapter sits in
slot ``s = slots[t]`` (``-1``: the base model, nothing added),
``y[t] += (x[t] @ a[s].T) @ b[s].T``, the scaling folded into ``b``. A fused projection (q, k and
v in one matmul; gate and up) has one low-rank pair per part: ``a[s]`` stacks the parts' ``A``
rows (``len(out_slices)`` blocks of ``rank`` rows) and ``b[s]`` their ``B`` rows, part ``i``'s
output columns ``out_slices[i]`` wide reading only its own block of the shrunk vector. Ranks
below ``rank`` are zero-padded. One call covers all rows and all adapters of the step, as vLLM's
punica kernels do (shrink, then expand), rather than one matmul per adapter.

Shapes: ``y`` ``[T, sum(out_slices)]`` (updated in place), ``x`` ``[T, in]``, ``a``
``[S, len(out_slices) * rank, in]``, ``b`` ``[S, sum(out_slices), rank]``, ``slots`` ``[T]``
int64.

:func:`add_lora_reference` is the definition, in torch ops. :func:`add_lora` runs the C kernel
on CPUs (:mod:`pagedserve.kernels.cpu`, kernels/csrc/lora_cpu.c: rows grouped by slot, shrink and
expand in one call) and the Triton kernels on CUDA tensors
(:mod:`pagedserve.kernels.triton_lora`); :mod:`pagedserve.kernels.dispatch` chooses.
"""

from __future__ import annotations

import torch

from pagedserve.kernels import cpu, dispatch


def add_lora_reference(y: torch.Tensor, x: torch.Tensor, a: torch.Tensor, b: torch.Tensor,
                       slots: torch.Tensor, out_slices: tuple[int, ...]) -> None:
    """The definition, in torch: the rows of each slot in turn."""
    rank = b.shape[2]
    for slot in torch.unique(slots).tolist():
        if slot < 0:
            continue
        rows = (slots == slot).nonzero()[:, 0]
        shrunk = x[rows].float() @ a[slot].float().T  # [rows, parts * rank]
        start = 0
        deltas = []
        for part, width in enumerate(out_slices):
            block = shrunk[:, part * rank: (part + 1) * rank]
            deltas.append(block @ b[slot, start: start + width].float().T)
            start += width
        y[rows] += torch.cat(deltas, dim=1).to(y.dtype)


def _rows(t: torch.Tensor) -> bool:
    """Whether the kernels take ``t`` as it is: 2-d with contiguous, separate rows."""
    return t.dim() == 2 and t.stride(1) == 1 and (t.shape[0] <= 1 or t.stride(0) >= t.shape[1])


def add_lora(y: torch.Tensor, x: torch.Tensor, a: torch.Tensor, b: torch.Tensor,
             slots: torch.Tensor, out_slices: tuple[int, ...], backend: str = "auto") -> None:
    """``y[t] += (x[t] @ a[slots[t]].T) @ b[slots[t]].T`` per part, for every row with a slot.

    ``backend`` as :func:`pagedserve.kernels.dispatch.resolve` takes it. The C kernel needs
    ``y``, ``x``, ``a`` and ``b`` of one dtype it takes, else the reference runs. The kernels
    get copies only of what they cannot read in place (``y``'s written back).
    """
    path = dispatch.resolve(backend, y.device)
    if path == "cpu" and not (y.dtype in cpu.DTYPES and x.dtype == y.dtype and a.dtype == y.dtype
                              and b.dtype == y.dtype and y.dim() == 2 and cpu.available()):
        path = "torch"
    if path == "torch":
        add_lora_reference(y, x, a, b, slots, out_slices)
        return
    target = y if _rows(y) else y.contiguous()
    args = (target, x if _rows(x) else x.contiguous(), a.contiguous(), b.contiguous(),
            slots.to(torch.int64).contiguous(), tuple(out_slices))
    if path == "triton":
        dispatch.triton_module("triton_lora", y.device).add_lora(*args)
    else:
        cpu.add_lora(*args)
    if target is not y:
        y.copy_(target)
