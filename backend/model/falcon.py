"""The Falcon architecture over a flattened token batch and a paged KV cache.

What sets Falcon apart from Llama, all read from its ``transformers`` config:

* one fused ``query_key_value`` projection whose rows interleave the heads in one of three
  layouts (multi-head ``[q k v]`` per head; multi-query all q heads then one k and one v; the
  ``new_decoder_architecture`` groups of q heads each followed by their k and v). They are
  reordered once at load into ``[all q | all k | all v]``, the layout the shared rotary and
  attention kernels read, with query head ``h`` using KV head ``h // group`` as ``transformers``
  broadcasts them;
* LayerNorm (with bias) instead of RMSNorm, and a GELU MLP;
* attention and MLP in parallel on the same normalised input (``parallel_attn``; the new
  architecture with two norms, ``ln_attn`` and ``ln_mlp``), or one after the other;
* rotary embedding, or ALiBi (``alibi``): a per-head linear bias on the key distance instead.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from transformers import PretrainedConfig

from pagedserve.kernels.attention import AttentionMetadata, paged_attention, write_kv
from pagedserve.kernels.linear import linear
from pagedserve.kernels.norm import add_layer_norm
from pagedserve.kernels.quant_linear import Weight
from pagedserve.kernels.rotary import rotary_write_kv
from pagedserve.model.base import KVCache, lm_head_name, run_layers
from pagedserve.model.llama import rotary_tables
from pagedserve.model.lora.slots import LoRABatch, LoRAGroup
from pagedserve.model.parallel import ParallelGroup, check_tensor_parallel
from pagedserve.model.projections import Rows, cast_weights, dense, projection

Norm = tuple[torch.Tensor, torch.Tensor | None]


def num_kv_heads(config: PretrainedConfig) -> int:
    """KV heads of the cache: grouped in the new architecture, one for multi-query, else one
    per query head."""
    if config.new_decoder_architecture:
        return int(config.num_kv_heads)
    return 1 if config.multi_query else int(config.num_attention_heads)


def alibi_slopes(num_heads: int) -> torch.Tensor:
    """ALiBi slopes ``[num_heads]`` as ``transformers``' Falcon makes them: the geometric series
    of the ALiBi paper (interleaved for head counts that are not powers of two), rounded to bf16
    as it rounds them."""
    closest = 2 ** math.floor(math.log2(num_heads))
    base = torch.tensor(2 ** (-(2 ** -(math.log2(closest) - 3))), dtype=torch.float32)
    slopes = torch.pow(base, torch.arange(1, 1 + closest, dtype=torch.int32))
    if closest != num_heads:
        extra = torch.tensor(2 ** (-(2 ** -(math.log2(2 * closest) - 3))), dtype=torch.float32)
        remaining = min(closest, num_heads - closest)
        slopes = torch.cat([slopes, torch.pow(extra, torch.arange(1, 1 + 2 * remaining, 2,
                                                                   dtype=torch.int32))])
    return slopes.bfloat16().float()


def _split_fused_qkv(t: torch.Tensor, config: PretrainedConfig, head_dim: int) -> torch.Tensor:
    """Rows of ``query_key_value`` (weight or bias) reordered to ``[q heads | k | v]``."""
    heads = config.num_attention_heads
    rest = t.shape[1:]
    if config.new_decoder_architecture:
        kv = config.num_kv_heads
        grouped = t.view(kv, heads // kv + 2, head_dim, *rest)
        parts = [grouped[:, :-2], grouped[:, -2], grouped[:, -1]]
    elif config.multi_query:
        return t
    else:
        interleaved = t.view(heads, 3, head_dim, *rest)
        parts = [interleaved[:, 0], interleaved[:, 1], interleaved[:, 2]]
    return torch.cat([p.reshape(-1, *rest) for p in parts])


def _lora_groups(config: PretrainedConfig, head_dim: int) -> dict[str, LoRAGroup]:
    """The projections as adapters see them (PEFT's module names for Falcon); an adapter's
    ``query_key_value`` rows are regrouped as the weight's are."""
    hidden = config.hidden_size
    inner = getattr(config, "ffn_hidden_size", None) or 4 * hidden
    heads = config.num_attention_heads
    fused = (heads + 2 * num_kv_heads(config)) * head_dim

    def rows(t: torch.Tensor) -> torch.Tensor:
        return _split_fused_qkv(t, config, head_dim)

    return {"qkv": LoRAGroup(("query_key_value",), hidden, (fused,), rows),
            "dense": LoRAGroup(("dense",), heads * head_dim, (hidden,)),
            "up": LoRAGroup(("dense_h_to_4h",), hidden, (inner,)),
            "down": LoRAGroup(("dense_4h_to_h",), inner, (hidden,))}


class FalconLayer:
    """One decoder layer: attention and GELU MLP behind LayerNorms, parallel or sequential."""

    def __init__(self, weights: dict[str, torch.Tensor], prefix: str, config: PretrainedConfig,
                 head_dim: int, slopes: torch.Tensor | None, quantization: str | None = None,
                 index: int = 0) -> None:
        def w(name: str) -> torch.Tensor:
            return weights[f"{prefix}.{name}"]

        def proj(name: str, rows: Rows | None = None) -> Weight:
            return projection(weights, [f"{prefix}.{name}.weight"], quantization,
                              self.attn_norm[0].dtype, rows)  # the model's: norms are plain

        def maybe(name: str) -> torch.Tensor | None:
            return weights.get(f"{prefix}.{name}")

        def norm(name: str) -> Norm:
            return w(f"{name}.weight"), maybe(f"{name}.bias")

        def qkv_rows(t: torch.Tensor) -> torch.Tensor:
            return _split_fused_qkv(t, config, head_dim)

        self.index = index  # its place in the model: which of an adapter's weights are its
        self.num_heads = config.num_attention_heads
        self.num_kv_heads = num_kv_heads(config)
        self.head_dim = head_dim
        self.scale = head_dim ** -0.5
        self.eps = config.layer_norm_epsilon
        # transformers adds the bias before scaling the scores: the slopes scale with them.
        self.alibi_slopes = None if slopes is None else slopes * self.scale
        self.mlp_norm: Norm | None = None  # the MLP's own norm, when it has one
        self.sequential = False
        if config.new_decoder_architecture and (config.num_ln_in_parallel_attn or 2) == 2:
            self.attn_norm, self.mlp_norm = norm("ln_attn"), norm("ln_mlp")
        else:
            self.attn_norm = norm("input_layernorm")
            if not config.new_decoder_architecture and not config.parallel_attn:
                self.sequential = True
                self.mlp_norm = norm("post_attention_layernorm")
        self.qkv = proj("self_attention.query_key_value", qkv_rows)
        bias = maybe("self_attention.query_key_value.bias")
        self.qkv_bias = None if bias is None else qkv_rows(bias)
        self.dense = proj("self_attention.dense")
        self.dense_bias = maybe("self_attention.dense.bias")
        self.up = proj("mlp.dense_h_to_4h")
        self.up_bias = maybe("mlp.dense_h_to_4h.bias")
        self.down = proj("mlp.dense_4h_to_h")
        self.down_bias = maybe("mlp.dense_4h_to_h.bias")

    def _attention(self, x: torch.Tensor, cos: torch.Tensor | None, sin: torch.Tensor | None,
                   cache: KVCache, meta: AttentionMetadata, lora: LoRABatch | None
                   ) -> torch.Tensor:
        tokens = x.shape[0]
        qkv = linear(x, self.qkv, self.qkv_bias)
        if lora is not None:
            lora.add(self.index, "qkv", qkv, x)
        if cos is None or sin is None:  # ALiBi: no rotation, the bias is in the attention
            q_size, kv_size = self.num_heads * self.head_dim, self.num_kv_heads * self.head_dim
            q = qkv[:, :q_size].view(tokens, self.num_heads, self.head_dim)
            k = qkv[:, q_size: q_size + kv_size].view(tokens, self.num_kv_heads, self.head_dim)
            v = qkv[:, q_size + kv_size:].view(tokens, self.num_kv_heads, self.head_dim)
            write_kv(k, v, cache[0], cache[1], meta.slot_mapping, meta.backend)
        else:
            q, k, v = rotary_write_kv(qkv, cos, sin, cache[0], cache[1], meta.slot_mapping,
                                      self.num_heads, self.num_kv_heads, meta.backend)
        attn = paged_attention(q, k, v, cache[0], cache[1], meta, self.scale,
                               alibi_slopes=self.alibi_slopes)
        attn = attn.reshape(tokens, self.num_heads * self.head_dim)
        out = linear(attn, self.dense, self.dense_bias)
        if lora is not None:
            lora.add(self.index, "dense", out, attn)
        return out

    def __call__(self, h: torch.Tensor, delta: torch.Tensor | None, cos: torch.Tensor | None,
                 sin: torch.Tensor | None, cache: KVCache, meta: AttentionMetadata,
                 lora: LoRABatch | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        """Adds the previous layer's output ``delta`` into the residual stream ``h`` (fused
        with the norm that reads it) and runs the layer: returns ``h`` and this layer's
        output, which the next layer (or the final norm) adds. ``lora`` adds each token's
        adapter deltas to every projection."""
        x = add_layer_norm(h, delta, *self.attn_norm, self.eps, meta.backend)
        attn = self._attention(x, cos, sin, cache, meta, lora)
        if self.sequential:
            assert self.mlp_norm is not None
            x = add_layer_norm(h, attn, *self.mlp_norm, self.eps, meta.backend)
            return h, self._mlp(x, lora)
        if self.mlp_norm is not None:
            x = add_layer_norm(h, None, *self.mlp_norm, self.eps, meta.backend)
        out = self._mlp(x, lora)
        out += attn  # transformers' order: mlp + attention, then the residual
        return h, out

    def _mlp(self, x: torch.Tensor, lora: LoRABatch | None) -> torch.Tensor:
        up = linear(x, self.up, self.up_bias)
        if lora is not None:
            lora.add(self.index, "up", up, x)
        act = F.gelu(up)
        down = linear(act, self.down, self.down_bias)
        if lora is not None:
            lora.add(self.index, "down", down, act)
        return down


class FalconModel:
    """Falcon as a ``CausalLM`` (:mod:`pagedserve.model.base`)."""

    sliding_window: int | None = None  # Falcon attends over the whole context

    def __init__(self, config: PretrainedConfig, weights: dict[str, torch.Tensor],
                 dtype: torch.dtype, device: str = "cpu",
                 parallel: ParallelGroup | None = None, quantization: str | None = None
                 ) -> None:
        # Its layers do not shard: one rank only.
        check_tensor_parallel(config, 1 if parallel is None else parallel.world_size)
        weights = cast_weights(weights, device, dtype)
        self.config = config
        self.num_layers = config.num_hidden_layers
        self.num_kv_heads = num_kv_heads(config)
        self.head_dim = config.hidden_size // config.num_attention_heads
        self.dtype = dtype
        self.device = device
        self.max_positions = config.max_position_embeddings
        slopes = alibi_slopes(config.num_attention_heads).to(device) if config.alibi else None
        embed = "transformer.word_embeddings.weight"
        self.embed = dense(weights, embed, dtype)  # looked up, not multiplied
        self.layers = [FalconLayer(weights, f"transformer.h.{i}", config, self.head_dim, slopes,
                                   quantization, i)
                       for i in range(self.num_layers)]
        self.lora_groups = _lora_groups(config, self.head_dim)
        self.final_norm: Norm = (weights["transformer.ln_f.weight"],
                                 weights.get("transformer.ln_f.bias"))
        self.eps = config.layer_norm_epsilon
        self.lm_head = projection(weights, [lm_head_name(config, weights, embed)], quantization,
                                  dtype)
        self.vocab_size = int(self.lm_head.shape[0])
        self.cos: torch.Tensor | None = None
        self.sin: torch.Tensor | None = None
        if not config.alibi:
            cos, sin = rotary_tables(config, self.head_dim, self.max_positions, dtype)
            self.cos, self.sin = cos.to(device), sin.to(device)

    @torch.inference_mode()
    def forward(self, input_ids: torch.Tensor, positions: torch.Tensor, caches: list[KVCache],
                meta: AttentionMetadata, hidden_states: list[torch.Tensor] | None = None,
                lora: LoRABatch | None = None) -> torch.Tensor:
        """Hidden states ``[num_tokens, hidden]`` after the final norm; with a
        ``hidden_states`` list, the embeddings and each layer's output are appended to it;
        with ``lora``, each token's adapter adds its deltas."""
        h = self.embed[input_ids]  # a copy: the layers add into it in place
        cos = None if self.cos is None else self.cos[positions]
        sin = None if self.sin is None else self.sin[positions]
        h, delta = run_layers(self.layers, h, cos, sin, caches, meta, hidden_states, lora)
        return add_layer_norm(h, delta, *self.final_norm, self.eps, meta.backend)

    @torch.inference_mode()
    def logits(self, hidden: torch.Tensor) -> torch.Tensor:
        """Vocabulary scores in fp32 for the given hidden states."""
        return linear(hidden, self.lm_head).float()
