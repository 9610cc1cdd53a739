"""The model families the engine serves, keyed as ``transformers`` names them.

A config's ``architectures`` (``LlamaForCausalLM``, ...) pick the family, its ``model_type``
where the architectures are missing. Families that are Llama with additions share
:class:`~pagedserve.model.llama.LlamaModel`; Falcon has its own module.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass

import torch
from transformers import PretrainedConfig

from pagedserve.model.base import CausalLM
from pagedserve.model.falcon import FalconModel
from pagedserve.model.llama import LlamaModel
from pagedserve.model.parallel import ParallelGroup

ModelBuilder = Callable[[PretrainedConfig, dict[str, torch.Tensor], torch.dtype, str,
                         ParallelGroup | None, str | None], CausalLM]


@dataclass(frozen=True)
class Family:
    """A supported architecture: its name, its ``transformers`` class, how to build it."""

    name: str  # the model_type
    architecture: str
    build: ModelBuilder


FAMILIES: dict[str, Family] = {f.name: f for f in (
    Family("llama", "LlamaForCausalLM", LlamaModel),
    Family("mistral", "MistralForCausalLM", LlamaModel),
    Family("qwen2", "Qwen2ForCausalLM", LlamaModel),
    Family("qwen3", "Qwen3ForCausalLM", LlamaModel),
    Family("falcon", "FalconForCausalLM", FalconModel),
)}
_BY_ARCHITECTURE = {f.architecture: f for f in FAMILIES.values()}


class UnsupportedModelError(ValueError):
    """The model's architecture is not one the engine implements."""


def supported() -> str:
    return ", ".join(f"{f.architecture} ({f.name})" for f in FAMILIES.values())


def find_family(architectures: Sequence[str] | None, model_type: str | None) -> Family:
    """The family of a model by its config's ``architectures`` and ``model_type``; raises
    ``UnsupportedModelError`` naming them otherwise."""
    for name in architectures or ():
        if name in _BY_ARCHITECTURE:
            return _BY_ARCHITECTURE[name]
    if not architectures and model_type in FAMILIES:
        return FAMILIES[model_type]
    named = ", ".join(architectures or ()) or "(none given)"
    raise UnsupportedModelError(f"architecture {named} (model type {model_type!r}) is not "
                                f"supported; supported: {supported()}")


def family_of(config: PretrainedConfig) -> Family:
    return find_family(getattr(config, "architectures", None), config.model_type)


def build_model(config: PretrainedConfig, weights: dict[str, torch.Tensor], dtype: torch.dtype,
                device: str = "cpu", parallel: ParallelGroup | None = None,
                quantization: str | None = None) -> CausalLM:
    """The engine's implementation of the model ``config`` describes, holding ``weights``: with
    a ``parallel`` group of more than one rank, only this rank's shards of them (a shape that
    does not split over the group is refused with ``ValueError`` naming the numbers); with a
    ``quantization`` (``"int8"``, ``"int4"``), its projections quantized (a shape the kernel
    cannot take is refused with ``ValueError`` naming it)."""
    return family_of(config).build(config, weights, dtype, device, parallel, quantization)
