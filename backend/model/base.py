"""What the engine needs of a model family: the ``CausalLM`` interface, and what the families
share in reading a ``transformers`` config."""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Protocol, TypeVar

import torch
from transformers import PretrainedConfig

from pagedserve.kernels.attention import AttentionMetadata
from pagedserve.kernels.quant_linear import Weight
from pagedserve.model.lora.slots import LoRABatch, LoRAGroup

KVCache = tuple[torch.Tensor, torch.Tensor]


class CausalLM(Protocol):
    """A causal LM over a flattened token batch and a paged KV cache (one per layer)."""

    config: PretrainedConfig
    num_layers: int
    num_kv_heads: int
    head_dim: int
    dtype: torch.dtype
    device: str
    max_positions: int
    # Every layer attends over at most this many trailing tokens (None: some layer sees all):
    # blocks wholly before a sequence's window can be released.
    sliding_window: int | None
    lm_head: Weight  # under tensor parallelism, this rank's rows of it
    vocab_size: int  # the scores ``logits`` returns per row: the whole vocabulary
    # Each layer's projections as LoRA adapters see them, by the name the layers apply them by.
    lora_groups: dict[str, LoRAGroup]

    def forward(self, input_ids: torch.Tensor, positions: torch.Tensor, caches: list[KVCache],
                meta: AttentionMetadata, hidden_states: list[torch.Tensor] | None = None,
                lora: LoRABatch | None = None) -> torch.Tensor:
        """Hidden states ``[num_tokens, hidden]`` after the final norm. With a
        ``hidden_states`` list, appends the embeddings and each layer's output to it (as
        ``transformers``' ``output_hidden_states``, before the final norm). With ``lora``,
        each token's adapter adds its deltas to the projections."""
        ...

    def logits(self, hidden: torch.Tensor) -> torch.Tensor:
        """Vocabulary scores in fp32 for the given hidden states: ``[..., vocab_size]`` on
        every rank of a tensor-parallel group."""
        ...


def layer_windows(config: PretrainedConfig) -> list[int | None]:
    """Each layer's sliding window (None: full attention), read as ``transformers`` reads it:
    ``layer_types`` where the config has them (Qwen2, Qwen3), else ``sliding_window`` for every
    layer (Mistral)."""
    window = getattr(config, "sliding_window", None)
    types = getattr(config, "layer_types", None)
    if window is None:
        return [None] * config.num_hidden_layers
    if types is None:
        return [window] * config.num_hidden_layers
    return [window if t == "sliding_attention" else None for t in types]


def common_window(windows: list[int | None]) -> int | None:
    """The window every layer keeps to (the widest), or None when a layer sees everything."""
    if not windows or any(w is None for w in windows):
        return None
    return max(w for w in windows if w is not None)


def lm_head_name(config: PretrainedConfig, weights: dict[str, torch.Tensor], embed: str
                 ) -> str:
    """The output projection's weight: the input embeddings ``embed`` when the config ties
    them (as ``transformers`` does, whatever the file holds), else ``lm_head.weight``."""
    if getattr(config, "tie_word_embeddings", False) or "lm_head.weight" not in weights:
        return embed
    return "lm_head.weight"


# The rotary tables a family's layers take: tensors, or None where the family has no rotary.
Rotary = TypeVar("Rotary", torch.Tensor, torch.Tensor | None)
# A decoder layer: (residual stream, previous layer's output, cos, sin, cache, metadata) ->
# (residual stream, this layer's output); the next layer or the final norm adds the output in.
Layer = Callable[[torch.Tensor, torch.Tensor | None, Rotary, Rotary, KVCache, AttentionMetadata,
                  LoRABatch | None], tuple[torch.Tensor, torch.Tensor]]


def run_layers(layers: Sequence[Layer[Rotary]], h: torch.Tensor, cos: Rotary, sin: Rotary,
               caches: list[KVCache], meta: AttentionMetadata,
               hidden_states: list[torch.Tensor] | None, lora: LoRABatch | None = None
               ) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Runs the decoder layers over the residual stream ``h``; returns it with the last
    layer's output, not yet added. With a ``hidden_states`` list, appends the embeddings and
    each layer's output to it, as ``transformers``' ``output_hidden_states``."""
    delta = None
    for layer, cache in zip(layers, caches):
        if hidden_states is not None:
            hidden_states.append(h.clone() if delta is None else h + delta)
        h, delta = layer(h, delta, cos, sin, cache, meta, lora)
    if hidden_states is not None and delta is not None:
        hidden_states.append(h + delta)
    return h, delta
