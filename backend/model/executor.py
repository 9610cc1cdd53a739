"""Where the model runs: one step in, its logits out, whatever the number of devices.

The engine sees an ``Executor``: ``execute(step)``, the facts it plans with (KV blocks,
vocabulary, positions, window, dtype, family, device) and ``shutdown()``. With one device the
model and its runner live in the engine's own process (``InProcessExecutor``: nothing spawned,
no copies); with ``tensor_parallel_size`` N > 1 they live in N worker processes, one per rank
(``pagedserve.model.multiproc``).
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Protocol

import torch
from transformers import PretrainedConfig

from pagedserve.config import EngineConfig
from pagedserve.lora_request import LoRARequest
from pagedserve.model.base import CausalLM
from pagedserve.model.batch import ModelInput, ModelOutput
from pagedserve.model.loader import LoadedModel, check_loaded_for, load_model
from pagedserve.model.lora.adapter import LoRAAdapter, load_adapter
from pagedserve.model.lora.cache import AdapterCache
from pagedserve.model.lora.residency import AdapterResidency
from pagedserve.model.lora.slots import LoRASlots
from pagedserve.model.registry import build_model, family_of
from pagedserve.model.runner import ModelRunner, num_kv_blocks


@dataclass(frozen=True)
class ModelFacts:
    """What the engine plans with, the same on every rank."""

    family: str
    num_kv_blocks: int  # blocks of the paged cache (on every rank, each its share of heads)
    vocab_size: int  # the full vocabulary, whatever the ranks hold
    max_positions: int
    sliding_window: int | None  # as ``CausalLM.sliding_window``
    device: torch.device  # where the logits come back


class ExecutorDied(RuntimeError):
    """A worker process is gone: the executor runs no more steps."""


class Executor(Protocol):
    facts: ModelFacts

    @property
    def device(self) -> torch.device:
        """Where the model's (rank 0's) weights are."""
        ...

    def execute(self, step: ModelInput) -> ModelOutput:
        """Runs one step (its block copies first); ``ExecutorDied`` if it never can again."""
        ...

    def load_lora(self, request: LoRARequest) -> None:
        """Reads and checks a LoRA adapter for the coming steps (``LoRAError`` if it is bad);
        called off the step thread."""
        ...

    def unload_lora(self, lora_id: int) -> None:
        """Forgets a LoRA adapter's loaded weights; any thread."""
        ...

    def failure(self) -> str | None:
        """Why no step can run any more (a dead worker), or ``None``; never blocks."""
        ...

    def check(self) -> None:
        """``ExecutorDied`` if a worker is gone, after stopping the others: called by the
        thread that runs the steps while it has none to run."""
        ...

    def shutdown(self) -> None:
        """Stops the workers, if any; idempotent."""
        ...


def model_facts(model: CausalLM, config: PretrainedConfig, num_blocks: int) -> ModelFacts:
    return ModelFacts(family=family_of(config).name, num_kv_blocks=num_blocks,
                      vocab_size=model.vocab_size, max_positions=model.max_positions,
                      sliding_window=model.sliding_window,
                      device=torch.device(model.device))


class InProcessExecutor:
    """The model and its paged cache in this process, on one device."""

    def __init__(self, config: EngineConfig, loaded: LoadedModel, owns_weights: bool) -> None:
        self.model = build_model(loaded.config, loaded.weights, config.torch_dtype,
                                 config.device, quantization=config.quantization)
        # The KV cache is sized from the memory left free: tensors the model replaced (q, k and
        # v projections fused into one) must be gone by then. A caller's weights are its own.
        if owns_weights:
            loaded.weights.clear()
        if config.device.startswith("cuda"):
            torch.cuda.empty_cache()
        # The adapters' slots are allocated before the KV cache is sized from what is left.
        adapters = _adapter_residency(config, self.model) if config.enable_lora else None
        num_blocks = num_kv_blocks(self.model, config)
        self.runner = ModelRunner(self.model, num_blocks, config.block_size,
                                  config.attention_backend, adapters,
                                  config.kv_cache_torch_dtype)
        self.facts = model_facts(self.model, loaded.config, num_blocks)

    @property
    def device(self) -> torch.device:
        """The device the weights are on now (read from them, not remembered)."""
        return self.model.lm_head.device

    def execute(self, step: ModelInput) -> ModelOutput:
        return self.runner.execute(step)

    def load_lora(self, request: LoRARequest) -> None:
        if self.runner.adapters is None:
            raise ValueError("LoRA is not enabled (enable_lora=False)")
        self.runner.adapters.preload(request)

    def unload_lora(self, lora_id: int) -> None:
        if self.runner.adapters is not None:
            self.runner.adapters.cache.discard(lora_id)

    def failure(self) -> str | None:
        return None

    def check(self) -> None:
        pass

    def shutdown(self) -> None:
        pass


def _adapter_residency(config: EngineConfig, model: CausalLM) -> AdapterResidency:
    slots = LoRASlots(model.lora_groups, model.num_layers, config.max_loras,
                      config.max_lora_rank, model.dtype, model.device)

    def read(name: str, path: str) -> LoRAAdapter:
        return load_adapter(Path(path), name, model.config, config.max_lora_rank)

    return AdapterResidency(slots, AdapterCache(config.lora_cache_size, read))


def start_executor(config: EngineConfig, loaded: LoadedModel | None
                   ) -> tuple[Executor, LoadedModel]:
    """The executor ``config`` asks for, with the model's config and tokenizer for the engine.

    ``loaded`` (a caller's weights, left as they are) or else ``config.model`` read here; with
    tensor parallelism the workers read the weights themselves and this process only the
    config and tokenizer.
    """
    if config.tensor_parallel_size == 1:
        owns_weights = loaded is None
        loaded = loaded or load_model(config.model, config.device, config.torch_dtype,
                                      quantization=config.quantization)
        check_loaded_for(loaded, config.quantization)
        return InProcessExecutor(config, loaded, owns_weights), loaded
    from pagedserve.model.multiproc import MultiprocExecutor

    described = loaded or load_model(config.model, config.device, config.torch_dtype,
                                     weights=False)
    return MultiprocExecutor(config, described.config, loaded), described
