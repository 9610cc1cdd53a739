"""The model's adapter weights: ``max_loras`` slots, each holding one adapter, stacked so that
one kernel call per projection serves every row of a step with its own adapter.

Each layer's projections are described by the model as :class:`LoRAGroup`\\ s: the modules
whose outputs one matmul joins (Llama's q, k and v; gate and up), each with its own low-rank
pair in an adapter. A group's slot tensors are laid out as :func:`pagedserve.kernels.lora.add_lora`
reads them: ``a`` ``[slots, parts * rank, in]``, ``b`` ``[slots, out, rank]``, adapters of a
lower rank zero-padded, modules an adapter leaves out all zeros.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch

from pagedserve.kernels.lora import add_lora
from pagedserve.model.lora.adapter import LoRAAdapter


@dataclass(frozen=True)
class LoRAGroup:
    """A projection of every layer as adapters see it: the modules whose output rows it joins,
    in order, their widths, and a reordering of the joined rows (Falcon's fused q|k|v rows are
    regrouped at load; an adapter's ``B`` rows move with them)."""

    modules: tuple[str, ...]
    in_features: int
    out_features: tuple[int, ...]
    rows: Callable[[torch.Tensor], torch.Tensor] | None = None


class LoRASlots:
    """The slot tensors of every (layer, group), on the model's device and in its dtype."""

    def __init__(self, groups: dict[str, LoRAGroup], num_layers: int, num_slots: int,
                 max_rank: int, dtype: torch.dtype, device: str) -> None:
        self.groups = groups
        self.num_slots = num_slots
        self.max_rank = max_rank
        self.stacks: dict[tuple[int, str], tuple[torch.Tensor, torch.Tensor]] = {}
        for layer in range(num_layers):
            for name, group in groups.items():
                parts = len(group.modules)
                a = torch.zeros(num_slots, parts * max_rank, group.in_features, dtype=dtype,
                                device=device)
                b = torch.zeros(num_slots, sum(group.out_features), max_rank, dtype=dtype,
                                device=device)
                self.stacks[(layer, name)] = (a, b)

    def load(self, slot: int, adapter: LoRAAdapter) -> None:
        """Puts ``adapter`` in ``slot`` (whatever was there goes)."""
        r = self.max_rank
        for (layer, name), (a, b) in self.stacks.items():
            group = self.groups[name]
            a[slot].zero_()
            b[slot].zero_()
            start = 0
            for part, (module, width) in enumerate(zip(group.modules, group.out_features,
                                                       strict=True)):
                pair = adapter.weights.get((layer, module))
                if pair is not None:
                    lora_a, lora_b = pair
                    rank = lora_a.shape[0]
                    if group.rows is not None:
                        lora_b = group.rows(lora_b)
                    a[slot, part * r: part * r + rank] = lora_a.to(a.dtype)
                    b[slot, start: start + width, :rank] = lora_b.to(b.dtype)
                start += width


@dataclass(frozen=True)
class LoRABatch:
    """A step's adapters as the layers apply them: each token's slot (-1: the base model)."""

    token_slots: torch.Tensor  # [tokens] int64
    weights: LoRASlots
    backend: str = "auto"  # which kernels (pagedserve.kernels.dispatch), as the step's others

    def add(self, layer: int, group: str, y: torch.Tensor, x: torch.Tensor) -> None:
        """Adds the adapters' deltas of ``layer``'s projection ``group`` (input ``x``, output
        ``y``) to ``y``, in place."""
        a, b = self.weights.stacks[(layer, group)]
        add_lora(y, x, a, b, self.token_slots, self.weights.groups[group].out_features,
                 self.backend)
