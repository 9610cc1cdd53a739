"""A decode step's decoder layers in one call to the C kernels, for Llama-family models whose
projections are all block-quantized (``quantization="gguf"``, ``"int4"``, ``"int8"``), in fp32
on CPUs.

A decode step at batch 1 is a few milliseconds of kernels behind a dozen Python calls a layer,
each checking its tensors and allocating its result; run from Python the host's share of the
step is large (``pagedserve.bench.step_overhead``). ``kernels/csrc/decode_layers_cpu.c`` runs every
layer of the step in one call, through the same kernels in the same order as the layers' own
``__call__``, so its results are those of the per-operation path bit for bit (tested): it is a
faster route to the same numbers, taken for steps whose every sequence has one new token and
whose caller wants no per-layer hidden states. Prefills, speculative verification and mixed
steps run the layers one by one.
"""

from __future__ import annotations

import ctypes
from collections.abc import Sequence
from typing import TYPE_CHECKING

import torch

from pagedserve.kernels import cpu
from pagedserve.kernels.attention import AttentionMetadata
from pagedserve.kernels.block_quant import BlockWeight
from pagedserve.model.base import KVCache

if TYPE_CHECKING:
    from pagedserve.model.llama import LlamaLayer


def _address(t: torch.Tensor | None) -> int | None:
    return None if t is None else t.data_ptr()


def _blocks(weight: object) -> BlockWeight:
    assert isinstance(weight, BlockWeight), "FusedDecode.of admits block weights only"
    return weight


def _fp32_vector(t: torch.Tensor | None) -> bool:
    return t is None or (t.dtype == torch.float32 and t.dim() == 1 and t.is_contiguous()
                         and t.device.type == "cpu")


def _shapes(layer: LlamaLayer) -> tuple[tuple[int, ...], ...]:
    return tuple(tuple(_blocks(w).shape) for w in (
        layer.qkv, layer.o_proj, layer.mlp_in, layer.down))


def _expected_shapes(shape: cpu.DecodeShape) -> tuple[tuple[int, ...], ...]:
    q_width = shape.num_heads * shape.head_dim
    qkv_rows = (shape.num_heads + 2 * shape.num_kv_heads) * shape.head_dim
    return ((qkv_rows, shape.hidden), (shape.hidden, q_width),
            (2 * shape.intermediate, shape.hidden), (shape.hidden, shape.intermediate))


class FusedDecode:
    """The fused decode path of a model's ``layers``; build with :meth:`of`."""

    def __init__(self, layers: Sequence[LlamaLayer], shape: cpu.DecodeShape) -> None:
        self.layers = list(layers)
        self.shape = shape
        self._caches: list[KVCache] = []
        self._cache_key: tuple[int, ...] = ()
        self._structs: ctypes.Array[cpu.DecodeLayer] | None = None

    @staticmethod
    def of(layers: Sequence[LlamaLayer], hidden: int) -> FusedDecode | None:
        """The fused path of ``layers``, or None where it does not apply: a projection that is
        not in blocks, a norm, bias or table not fp32 on the CPU, tensor parallelism, or the C
        kernels not built."""
        if not layers or not cpu.available():
            return None
        first = layers[0]
        for layer in layers:
            weights = (layer.qkv, layer.o_proj, layer.mlp_in, layer.down)
            if layer.parallel is not None or \
                    not all(isinstance(w, BlockWeight) and w.device.type == "cpu"
                            for w in weights) or \
                    not all(_fp32_vector(t) for t in (
                        layer.input_norm, layer.post_attention_norm, layer.qkv_bias,
                        layer.o_bias, layer.gate_bias, layer.up_bias, layer.down_bias,
                        layer.q_norm, layer.k_norm)):
                return None
        gate_up = first.mlp_in
        assert isinstance(gate_up, BlockWeight)
        shape = cpu.DecodeShape(hidden=hidden, intermediate=gate_up.shape[0] // 2,
                                num_heads=first.num_heads, num_kv_heads=first.num_kv_heads,
                                head_dim=first.head_dim, eps=first.eps, scale=first.scale)
        # The C layers size their scratch from one shape for all: every layer must have it.
        if not all(_shapes(layer) == _expected_shapes(shape) and layer.eps == shape.eps
                   and layer.scale == shape.scale for layer in layers):
            return None
        return FusedDecode(layers, shape)

    def applies(self, h: torch.Tensor, meta: AttentionMetadata) -> bool:
        """Whether this step can take the fused path: one new token per sequence, fp32 on the
        CPU kernels."""
        return (meta.backend == "cpu" and h.dtype == torch.float32 and h.device.type == "cpu"
                and 0 < meta.num_decodes == len(meta.seq_lens) == h.shape[0])

    def _layer_structs(self, caches: list[KVCache]) -> ctypes.Array[cpu.DecodeLayer]:
        """The layers' C structures, built again when the caches are not those of last time
        (the structures hold the caches' addresses)."""
        key = tuple(t.data_ptr() for pair in caches for t in pair)
        if self._structs is None or key != self._cache_key:
            structs = (cpu.DecodeLayer * len(self.layers))()
            for s, layer, (k_cache, v_cache) in zip(structs, self.layers, caches):
                qkv, o, gate_up, down = (_blocks(w) for w in (
                    layer.qkv, layer.o_proj, layer.mlp_in, layer.down))
                if not (k_cache.dtype == v_cache.dtype and k_cache.dtype in cpu.CACHE_TYPES
                        and k_cache.is_contiguous() and v_cache.is_contiguous()):
                    raise ValueError("the fused decode layers take a contiguous fp32, bf16 or "
                                     "fp16 KV cache")
                s.input_norm = _address(layer.input_norm)
                s.post_norm = _address(layer.post_attention_norm)
                s.qkv, s.o = qkv.blocks.data_ptr(), o.blocks.data_ptr()
                s.gate_up, s.down = gate_up.blocks.data_ptr(), down.blocks.data_ptr()
                s.qkv_kind, s.o_kind = cpu.BLOCK_KINDS[qkv.kind], cpu.BLOCK_KINDS[o.kind]
                s.gate_up_kind = cpu.BLOCK_KINDS[gate_up.kind]
                s.down_kind = cpu.BLOCK_KINDS[down.kind]
                s.qkv_bias, s.o_bias = _address(layer.qkv_bias), _address(layer.o_bias)
                s.gate_bias, s.up_bias = _address(layer.gate_bias), _address(layer.up_bias)
                s.down_bias = _address(layer.down_bias)
                s.q_norm, s.k_norm = _address(layer.q_norm), _address(layer.k_norm)
                s.k_cache, s.v_cache = k_cache.data_ptr(), v_cache.data_ptr()
                s.window = layer.sliding_window or 0
            self._structs, self._cache_key, self._caches = structs, key, list(caches)
        return self._structs

    def __call__(self, h: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor,
                 caches: list[KVCache], meta: AttentionMetadata
                 ) -> tuple[torch.Tensor, torch.Tensor]:
        """Runs the layers over ``h`` (updated in place); returns it with the last layer's
        output, not yet added, as :func:`pagedserve.model.base.run_layers`."""
        k_cache = caches[0][0]
        delta = cpu.decode_layers(
            self._layer_structs(caches), self.shape, h, cos, sin, meta.slot_mapping,
            k_cache.shape[0], k_cache.shape[1], meta.block_tables, meta.decode_lens,
            k_cache.dtype)
        return h, delta
