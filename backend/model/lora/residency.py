"""Which adapter sits in which of the model's ``max_loras`` slots, step by step.

A step names its adapters (``ModelInput.loras``; the scheduler lets no more than ``max_loras``
into one step). Each is put in a slot unless it is there already: a free slot, else the one
used least recently by an adapter this step does not run. Adapters come from the
:class:`~pagedserve.model.lora.cache.AdapterCache`, which the engine fills off the step thread
before the request that names one is queued: a step copies tensors and reads no file unless
more adapters are in use than the cache keeps (``max_cpu_loras``), when one is read again
here. Should that read fail, the engine runs the step's requests apart and only those of that
adapter fail.
"""

from __future__ import annotations

from collections import OrderedDict

import torch

from pagedserve.kernels.dispatch import to_device
from pagedserve.lora_request import LoRARequest
from pagedserve.model.batch import ModelInput
from pagedserve.model.lora.cache import AdapterCache
from pagedserve.model.lora.slots import LoRABatch, LoRASlots


class AdapterResidency:
    """The slots' occupants, least recently used first."""

    def __init__(self, weights: LoRASlots, cache: AdapterCache) -> None:
        self.weights = weights
        self.cache = cache
        self._slot_of: OrderedDict[int, tuple[int, LoRARequest]] = OrderedDict()

    def preload(self, request: LoRARequest) -> None:
        """Reads and checks the adapter into the cache (``LoRAError`` if it is bad)."""
        self.cache.get(request.lora_int_id, request.lora_name, request.lora_path)

    def batch(self, step: ModelInput, device: torch.device, backend: str = "auto"
              ) -> LoRABatch | None:
        """The step's adapters in slots, and each of its tokens' slot; None without adapters."""
        if not step.loras:
            return None
        if len(step.loras) > self.weights.num_slots:
            raise ValueError(f"a step with {len(step.loras)} adapters: max_loras is "
                             f"{self.weights.num_slots}")
        slot_of = {lora_id: self._place(lora_id, request, step.loras)
                   for lora_id, request in step.loras.items()}
        token_slots: list[int] = []
        for chunk in step.chunks:
            token_slots += [slot_of.get(chunk.lora_id, -1)] * len(chunk.token_ids)
        return LoRABatch(to_device(token_slots, torch.long, device), self.weights, backend)

    def _place(self, lora_id: int, request: LoRARequest, needed: dict[int, LoRARequest]) -> int:
        held = self._slot_of.get(lora_id)
        if held is not None and held[1] == request:
            self._slot_of.move_to_end(lora_id)
            return held[0]
        if held is not None:  # the id now names another adapter: its slot is reloaded
            slot = held[0]
            del self._slot_of[lora_id]
        else:
            taken = {s for s, _ in self._slot_of.values()}
            free = [s for s in range(self.weights.num_slots) if s not in taken]
            if free:
                slot = free[0]
            else:
                victim = next(i for i in self._slot_of if i not in needed)
                slot = self._slot_of.pop(victim)[0]
        adapter = self.cache.get(lora_id, request.lora_name, request.lora_path)
        self.weights.load(slot, adapter)
        self._slot_of[lora_id] = (slot, request)
        return slot
